"""GPTQ math on small random layers: lower output error than RTN on the same inputs."""

from __future__ import annotations

import pytest
import torch

from slimformer.calibrate.hessian_math import accumulate_hessian
from slimformer.quant.gptq_math import gptq_quantize
from slimformer.quant.qscheme import compute_qparams, dequantize, fake_quantize, qrange


def _layer_and_inputs(out_f: int = 48, in_f: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mix = torch.randn(in_f, in_f) * 0.3  # correlated inputs, as real activations are
    x = torch.randn(4096, in_f) @ mix + torch.randn(4096, in_f)
    return torch.randn(out_f, in_f), x


@pytest.mark.parametrize("group_size, act_order", [(32, False), (64, True), (-1, False), (0, False), (128, False)])
def test_gptq_beats_rtn_on_output_error(group_size: int, act_order: bool) -> None:
    w, x = _layer_and_inputs()
    h, n = accumulate_hessian(None, x[:2048], 0)
    h, n = accumulate_hessian(h, x[2048:], n)
    codes, qp = gptq_quantize(w, h, 3, group_size, False, act_order=act_order)
    qmin, qmax = qrange(3, False)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    err_gptq = (x @ (w - dequantize(codes, qp)).T).pow(2).mean()
    err_rtn = (x @ (w - fake_quantize(w, 3, group_size, False)[0]).T).pow(2).mean()
    assert err_gptq < 0.75 * err_rtn


def test_dead_inputs_and_smaller_last_group() -> None:
    w, x = _layer_and_inputs(8, 40)
    x[:, 5] = 0  # an input that never fires
    h, _ = accumulate_hessian(None, x, 0)
    codes, qp = gptq_quantize(w, h, 4, 16, True)  # 40 = 16 + 16 + 8
    assert qp.scale.shape == (8, 3)
    assert bool(torch.isfinite(dequantize(codes, qp)).all())
    assert bool((codes[:, 5] == 0).all())  # dead input column: weight zeroed, code 0 (symmetric)


@pytest.mark.parametrize("symmetric, rules", [(True, {"scale_rule": "signed_max"}), (False, {"zero_point": "float"})])
def test_gptq_beats_rtn_with_llama_cpp_rules(symmetric: bool, rules: dict) -> None:
    w, x = _layer_and_inputs()
    h, _ = accumulate_hessian(None, x, 0)
    codes, qp = gptq_quantize(w, h, 3, 32, symmetric, **rules)
    assert qp.scale_rule == rules.get("scale_rule", "absmax") and qp.zero_point == rules.get("zero_point", "int")
    assert (qp.minimum is not None) == (not symmetric)
    assert int(codes.min()) >= qrange(3, symmetric)[0] and int(codes.max()) <= qrange(3, symmetric)[1]
    err_gptq = (x @ (w - dequantize(codes, qp)).T).pow(2).mean()
    err_rtn = (x @ (w - fake_quantize(w, 3, 32, symmetric, **rules)[0]).T).pow(2).mean()
    assert err_gptq < 0.75 * err_rtn


@pytest.fixture(scope="module")
def smollm_q_proj(smollm_bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """SmolLM2 block 0's q_proj weight and its real inputs on 6 calibration windows of 256 tokens
    (tokens, 576): only the embedding and block 0 run."""
    from slimformer.calibrate.engine import capture_first_block_inputs, observe_linears
    from slimformer.data.sources import load_data
    from slimformer.data.windows import calibration_windows
    from slimformer.models.layout import find_blocks

    windows = calibration_windows(smollm_bundle.tokenizer, load_data("lee-news", "calib"), 6, 256)
    inputs = capture_first_block_inputs(smollm_bundle.model, windows, batch_size=6)
    block = find_blocks(smollm_bundle.model)[1][0]
    seen: dict[str, torch.Tensor] = {}
    observe_linears(block, {"q": block.self_attn.q_proj}, inputs, lambda name, x: seen.setdefault(name, x.clone()))
    return block.self_attn.q_proj.weight.detach().float(), seen["q"]


@pytest.mark.parametrize("symmetric, rules, group_size", [
    (True, {"scale_rule": "signed_max"}, 32), (True, {"scale_rule": "signed_max"}, 128),
    (False, {"zero_point": "float"}, 128), (False, {"zero_point": "float"}, 64),
])
def test_gptq_beats_rtn_on_real_activations(smollm_q_proj, symmetric: bool, rules: dict, group_size: int) -> None:
    """Fitted on 4 windows, scored on 2 held-out ones: GPTQ's output error under each llama.cpp rule
    is well below RTN's under the same rule (measured 0.39-0.43x)."""
    w, x = smollm_q_proj
    fit, held_out = x[: 4 * 256], x[4 * 256 :]
    codes, qp = gptq_quantize(w, accumulate_hessian(None, fit, 0)[0], 4, group_size, symmetric, **rules)
    err_gptq = (held_out @ (w - dequantize(codes, qp)).T).pow(2).mean()
    err_rtn = (held_out @ (w - fake_quantize(w, 4, group_size, symmetric, **rules)[0]).T).pow(2).mean()
    assert err_gptq < 0.6 * err_rtn


def test_smollm_weights_sit_on_a_float_minimum_g32_grid(smollm_q_proj) -> None:
    """SmolLM2's packaged weights were dequantized from Q4_1: RTN with zero_point float at 4 bits,
    g32 gives them back bit for bit (so GPTQ cannot improve on it there, and g32 float results on
    this model say nothing about other models); the integer zero point does not."""
    w, _ = smollm_q_proj
    assert torch.equal(fake_quantize(w, 4, 32, False, zero_point="float")[0], w)
    assert not torch.equal(fake_quantize(w, 4, 32, False)[0], w)


def test_searched_group_never_worse_and_shrinks_heavy_tails() -> None:
    """Per row, the searched scale's weighted error is at most the full range's (1.0 is a candidate),
    and on heavy-tailed rows a shrunk range wins for some rows."""
    from slimformer.quant.gptq_math import searched_group
    from slimformer.quant.qscheme import decode, encode

    torch.manual_seed(0)
    wg = torch.distributions.StudentT(2.0).sample((64, 32))
    importance = torch.rand(32) + 0.1
    rules = {"scale_rule": "signed_max", "zero_point": "int"}
    enc, dec = searched_group(wg, importance, 4, True, rules)
    full = compute_qparams(wg, 4, -1, True, **rules)

    def err(e, d) -> torch.Tensor:
        return ((wg - decode(encode(wg, e, 4, True, "signed_max"), d, "signed_max")) ** 2 * importance).sum(1)

    searched = err([t[:, None] for t in enc], [t[:, None] for t in dec])
    plain = err(full.encoder(), full.decoder())
    assert bool((searched <= plain + 1e-6).all()) and float(searched.sum()) < 0.97 * float(plain.sum())  # measured 0.949
    assert bool((dec[0].abs() < full.decoder()[0][:, 0].abs() - 1e-6).any())  # some rows shrank


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric, rules, group_size", [(True, {"scale_rule": "signed_max"}, 32),
                                                        (False, {"zero_point": "float"}, 64)])
def test_scale_search_lowers_gptq_output_error_on_real_activations(smollm_q_proj, symmetric: bool, rules: dict,
                                                                   group_size: int, act_order: bool) -> None:
    """On SmolLM2's q_proj (fit on 4 windows, scored on 2 held out), GPTQ with scale_search has a
    lower output error than without it (asymmetric at g64: at g32 SmolLM2's weights are exact)."""
    w, x = smollm_q_proj
    fit, held_out = x[: 4 * 256], x[4 * 256 :]
    h = accumulate_hessian(None, fit, 0)[0]
    errors = []
    for search in (False, True):
        codes, qp = gptq_quantize(w, h, 4, group_size, symmetric, scale_search=search, act_order=act_order, **rules)
        errors.append(float((held_out @ (w - dequantize(codes, qp)).T).pow(2).mean()))
    # measured 0.70 (sym g32), 0.59 (float g64); with act-order the search sees the original weights,
    # not GPTQ's updated ones, and gains less (0.78, 0.68) from a lower start. Before the least-squares
    # refit joined the search: 0.80, 0.85 and 0.88, 0.95 with act-order.
    assert errors[1] < (0.85 if act_order else 0.8) * errors[0], errors


@pytest.mark.parametrize("symmetric, rules", [(True, {"scale_rule": "signed_max"}), (False, {"zero_point": "float"}),
                                              (True, {"scale_rule": "absmax"})])
def test_refit_recovers_exact_grids_and_never_loses_to_the_range(symmetric: bool, rules: dict) -> None:
    """Weights that sit exactly on a grid (codes q, fp16 d and m) come back exactly from their codes;
    on random weights the refit's weighted error is at most the min/max parameters' for the same codes."""
    from slimformer.quant.gptq_math import _refit
    from slimformer.quant.qscheme import decode, encode, rule_of

    rule = rule_of(rules.get("scale_rule", "absmax"), rules.get("zero_point", "int"))
    torch.manual_seed(0)
    lo, hi = (-8, 8) if symmetric else (0, 16)
    q = torch.randint(lo, hi, (16, 32)).float()
    d = (torch.rand(16, 1) * 0.01 + 0.001).half().float()
    m = (-torch.rand(16, 1) * 0.05).half().float() if rule == "float" else torch.zeros(16, 1)
    wg = d * q + m
    importance = torch.rand(32) + 0.1
    _, (d_fit, m_fit) = _refit(wg, q, importance, (torch.ones(16, 1), torch.zeros(16, 1)), rule)
    assert torch.allclose(d_fit, d, rtol=2e-3) and torch.allclose(m_fit, m, atol=1e-4)

    wg = torch.randn(16, 32)
    qp = compute_qparams(wg, 4, -1, symmetric, **rules)
    codes = encode(wg, qp.encoder(), 4, symmetric, rule)
    _, dec = _refit(wg, codes, importance, qp.decoder(), rule)

    def err(dec: tuple) -> torch.Tensor:
        return ((wg - decode(codes, dec, rule)) ** 2 * importance).sum(1)

    assert bool((err(dec) <= err(qp.decoder()) * (1 + 1e-3) + 1e-7).all())
    assert float(err(dec).sum()) < 0.98 * float(err(qp.decoder()).sum())  # measured about 0.94-0.96


def test_scale_search_needs_groups() -> None:
    from slimformer.errors import UserError
    from slimformer.quant.gptq import GPTQConfig

    assert GPTQConfig(scale_search=True).act_order  # act-order is the default, and the search goes with it
    with pytest.raises(UserError, match="scale_search"):
        GPTQConfig(scale_search=True, group_size=-1)


@pytest.mark.parametrize("in_features, group_size", [(192, 32), (200, 64)])
def test_static_group_search_equals_the_search_of_each_group(in_features: int, group_size: int) -> None:
    """The act-order path searches all groups at once, a few per chunk: its parameters equal
    `searched_group` run on each group alone, bit for bit, a shorter last group included."""
    from slimformer.quant.gptq_math import _searched_static_groups, searched_group

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((24, in_features))
    importance = torch.rand(in_features) + 0.1
    rules = {"scale_rule": "signed_max", "zero_point": "int"}
    enc, dec = _searched_static_groups(w, importance, 4, group_size, True, rules, chunk_elements=24 * group_size * 2)
    for g, c in enumerate(range(0, in_features, group_size)):
        e, d = searched_group(w[:, c : c + group_size], importance[c : c + group_size], 4, True, rules)
        assert all(torch.equal(mine[g], one) for mine, one in zip(enc + dec, e + d))


@pytest.mark.parametrize("group_size", [64, 128])
def test_fp32_factor_of_wide_inputs_quantizes_as_well_as_fp64(smollm_q_proj, group_size: int) -> None:
    """Inputs wider than FP64_MAX_WIDTH get their inverse factor in fp32 (to fit Llama-3-8B's
    down_proj beside its weights). On SmolLM2's q_proj (the fp32 path forced), act-order GPTQ's
    held-out output error with it is within 1% of the fp64 factor's, and the diagonal alone
    (what the models' loops pass once the factor is made) gives the same codes as the full H."""
    from slimformer.calibrate.hessian_math import inverse_hessian_factor

    w, x = smollm_q_proj
    fit, held_out = x[: 4 * 256], x[4 * 256 :]
    h = accumulate_hessian(None, fit, 0)[0]
    order = torch.argsort(torch.diag(h), descending=True)
    errors, codes_of = [], []
    for max_width in (8192, 0):
        factor = (order, inverse_hessian_factor(h, 0.01, order, fp64_max_width=max_width))
        codes, qp = gptq_quantize(w, torch.diag(h), 4, group_size, False, act_order=True, factor=factor)
        errors.append(float((held_out @ (w - dequantize(codes, qp)).T).pow(2).mean()))
        codes_of.append(codes)
    assert abs(errors[1] / errors[0] - 1) < 0.01, errors
    assert torch.equal(codes_of[0], gptq_quantize(w, h, 4, group_size, False, act_order=True)[0])
