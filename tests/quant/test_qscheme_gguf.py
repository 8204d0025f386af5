"""llama.cpp's parametrizations (scale_rule signed_max, zero_point float): the codes, d and m that
`gguf.quants` (llama.cpp's reference quantizers in numpy) writes for Q4_0/Q5_0/Q4_1/Q5_1, exactly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from slimformer.errors import UserError
from slimformer.quant.qscheme import compute_qparams, dequantize, expand_groups, fake_quantize, quantize
from slimformer.recipe import Recipe

# (GGUF block type, bits, symmetric, rule keys); every block holds 32 weights, fp16 d first (then m for _1)
BLOCKS = [
    pytest.param(GGMLQuantizationType.Q4_0, 4, True, {"scale_rule": "signed_max"}, id="Q4_0"),
    pytest.param(GGMLQuantizationType.Q5_0, 5, True, {"scale_rule": "signed_max"}, id="Q5_0"),
    pytest.param(GGMLQuantizationType.Q4_1, 4, False, {"zero_point": "float"}, id="Q4_1"),
    pytest.param(GGMLQuantizationType.Q5_1, 5, False, {"zero_point": "float"}, id="Q5_1"),
]


def _weights(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(64, 256) * torch.logspace(-3, 0, 64).unsqueeze(1)  # rows of very different magnitude


def _block_fields(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d (and m for the _1 types) of every 32-weight block, as fp16 (64, 8), read from the GGUF bytes."""
    blocks = raw.reshape(64, 8, -1)  # (rows, blocks per row, bytes per block)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].copy())
    has_min = qtype in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1)
    m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].copy()) if has_min else None
    return d, m


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("qtype, bits, symmetric, rules", BLOCKS)
def test_reproduces_llama_cpp_reference_quantizers(seed: int, qtype, bits: int, symmetric: bool, rules) -> None:
    w = _weights(seed)
    qp = compute_qparams(w, bits, 32, symmetric, **rules)
    codes = quantize(w, qp)
    raw = gguf_quantize(w.numpy(), qtype)
    reference = torch.from_numpy(gguf_dequantize(raw, qtype).copy())
    assert torch.equal(dequantize(codes, qp), reference)  # every weight, bit for bit
    d, m = _block_fields(raw, qtype)
    assert torch.equal(qp.scale.view(torch.int16), d.view(torch.int16))  # the fp16 d bits themselves
    if m is not None:
        assert torch.equal(qp.minimum.view(torch.int16), m.view(torch.int16))
        assert bool((qp.zero == 0).all())
    else:
        assert qp.minimum is None and bool((qp.zero == 0).all())


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
def test_signed_max_gives_the_extreme_weight_the_lowest_code(bits: int) -> None:
    w = _weights(bits)
    _, codes, qp = fake_quantize(w, bits, 32, True, scale_rule="signed_max")
    groups_w, groups_q = w.view(64, 8, 32), codes.view(64, 8, 32)
    peak = groups_w.abs().argmax(dim=-1, keepdim=True)
    assert bool((groups_q.gather(-1, peak) == -(2 ** (bits - 1))).all())  # every group's extreme element
    assert int(codes.min()) == -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    # d carries the extreme element's sign: negative for groups whose extreme weight is positive
    sign = torch.sign(groups_w.gather(-1, peak)[..., 0])
    assert torch.equal(torch.sign(qp.scale.float()), -sign)
    # the absmax rule never reaches the lowest code (|w| / (absmax / (2^(b-1) - 1)) <= 2^(b-1) - 1)
    assert int(fake_quantize(w, bits, 32, True)[1].min()) >= -(2 ** (bits - 1)) + 1


def test_float_minimum_is_not_widened_to_include_zero() -> None:
    w = torch.rand(4, 64) + 1.0  # all weights in [1, 2): the int zero point's range would start at 0
    w_hat, codes, qp = fake_quantize(w, 4, 32, False, zero_point="float")
    lo = w.view(4, 2, 32).amin(-1)
    assert torch.equal(qp.minimum, lo.half())
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    step = expand_groups(qp.scale.float(), 64, 32)
    assert bool(((w - w_hat).abs() <= step).all())  # within a step (d and m rounded to fp16)
    int_zero = fake_quantize(w, 4, 32, False)[0]  # range [0, 2): twice the step
    assert (w - w_hat).pow(2).sum() < 0.5 * (w - int_zero).pow(2).sum()


@pytest.mark.parametrize("rules, symmetric", [({"scale_rule": "signed_max"}, True), ({"zero_point": "float"}, False)])
@pytest.mark.parametrize("group_size", [-1, 0, 128])
def test_other_group_shapes_and_zero_rows(rules, symmetric: bool, group_size: int) -> None:
    w = _weights(5)[:, :200]  # 200 = 128 + 72: a smaller last group
    w[3] = 0.0
    w_hat, codes, qp = fake_quantize(w, 4, group_size, symmetric, **rules)
    expected = (1, 1) if group_size == 0 else (64, 1 if group_size == -1 else 2)
    assert tuple(qp.scale.shape) == expected and bool(torch.isfinite(w_hat).all())
    if group_size != 0:
        assert bool((w_hat[3] == 0).all())
    step = expand_groups(qp.scale.float().abs(), 200, group_size).expand(64, 200)
    assert bool(((w - w_hat).abs() <= step).all())


def test_stored_parameters_rebuild_the_same_weights() -> None:
    """The fp16 (d, m) pair is all dequantization uses: qparams without the float32 encoding
    (as a reloaded layer has) give the same weights from the same codes."""
    import dataclasses

    w = _weights(7)
    for symmetric, rules in ((True, {"scale_rule": "signed_max"}), (False, {"zero_point": "float"})):
        qp = compute_qparams(w, 4, 32, symmetric, **rules)
        codes = quantize(w, qp)
        stored = dataclasses.replace(qp, encoding=None)
        assert torch.equal(dequantize(codes, stored), dequantize(codes, qp))


@pytest.mark.parametrize("step, message", [
    ("{method: rtn, scale_rule: signed_max}", "rtn: scale_rule 'signed_max' sets the scale of a symmetric scheme"),
    ("{method: gptq, symmetric: true, zero_point: float}", "gptq: zero_point 'float' is for asymmetric schemes"),
    ("{method: awq, zero_point: half}", "(awq).zero_point: got 'half', expected one of 'int', 'float'"),
    ("{method: rtn, symmetric: true, scale_rule: max}",
     "(rtn).scale_rule: got 'max', expected one of 'absmax', 'signed_max'"),
])
def test_recipe_keys_are_checked(step: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        Recipe.from_yaml(f"steps: [{step}]")


def test_recipe_keys_build_configs_and_other_methods_refuse_them() -> None:
    for step, rules in (("{method: gptq, symmetric: true, scale_rule: signed_max}", ("signed_max", "int")),
                        ("{method: awq, zero_point: float}", ("absmax", "float")),
                        ("{method: rtn, bits: 5, group_size: 32, zero_point: float}", ("absmax", "float"))):
        config = Recipe.from_yaml(f"steps: [{step}]").steps[0].config
        assert (config.scale_rule, config.zero_point) == rules
    with pytest.raises(UserError, match=r"\(sparsegpt\): unknown key\(s\) zero_point"):
        Recipe.from_yaml("steps: [{method: sparsegpt, sparsity: 0.5, bits: 4, zero_point: float}]")


def test_direct_config_values_are_checked() -> None:
    from slimformer.quant.rtn import RTNConfig

    with pytest.raises(UserError, match="rtn: scale_rule must be one of absmax, signed_max, got 'signed'"):
        RTNConfig(symmetric=True, scale_rule="signed")
    assert RTNConfig().scale_rule == "absmax" and RTNConfig().zero_point == "int"
