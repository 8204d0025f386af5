"""wanda / sparsegpt / taylor / gradient / magnitude on tiny random models: exact counts per scope
and pattern, OWL allocation, joint SparseGPT + quantization through the artifact, bad values."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import tiny_ctx, tiny_llama  # tests/tiny.py

from slimformer.artifact import load_artifact, read_manifest, save_artifact
from slimformer.config import build_config
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import select_linears, weight_view
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import expand_groups
from slimformer.registry import get_method


def _ctx(kind: str = "decoder") -> StepContext:
    return tiny_ctx(" ".join(f"sentence {i} about pruning tiny random language models" for i in range(60)), kind)


def _llama() -> torch.nn.Module:
    return tiny_llama(hidden_size=32, intermediate_size=64, max_position_embeddings=2048)


def _run(model: torch.nn.Module, method: str, ctx: StepContext | None = None, **values) -> dict:
    m = get_method(method)
    calib = {"num_samples": 2 if method in ("taylor", "gradient") else 4, "seq_len": 64}  # a backward pass each
    calib = calib if method != "magnitude" or values.get("allocation") else {}
    config = build_config(m.config_cls, {**calib, **values}, method)
    return m.apply(model, config, ctx or _ctx())


def _zeros(model: torch.nn.Module) -> dict[str, int]:
    return {n: int((weight_view(m) == 0).sum()) for n, m in select_linears(model, None).items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "taylor", "gradient"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_exact_for_every_method(method: str, pattern: str) -> None:
    model = _llama()
    info = _run(model, method, pattern=pattern)
    n, m = map(int, pattern.split(":"))
    assert info["layers"] == 14 and info["sparsity"] == pytest.approx(1 - n / m)
    for name, layer in select_linears(model, None).items():
        w = weight_view(layer)
        assert bool(((w != 0).view(w.shape[0], -1, m).sum(-1) == n).all()), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "taylor", "gradient"])
def test_layer_scope_exact_counts(method: str) -> None:
    model = _llama()
    _run(model, method, sparsity=0.4)
    for name, zeros in _zeros(model).items():
        w = weight_view(model.get_submodule(name))
        assert zeros == round(0.4 * w.numel()), name
        if method == "wanda":  # compared within each output row: floor or ceil of 0.4 x in per row
            per_row = (w == 0).sum(1)
            assert int(per_row.max() - per_row.min()) <= 1 and int(per_row.min()) == int(0.4 * w.shape[1]), name


@pytest.mark.parametrize("method", ["taylor", "gradient", "magnitude"])
def test_global_scope_total_exact_and_uneven(method: str) -> None:
    model = _llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.01)  # it and the layers feeding it matter less
    info = _run(model, method, sparsity=0.5, scope="global")
    total = sum(weight_view(m).numel() for m in select_linears(model, None).values())
    assert sum(_zeros(model).values()) == round(0.5 * total)
    assert max(info["layer_sparsity"].values()) - min(info["layer_sparsity"].values()) > 0.05


def test_wanda_differs_from_magnitude_and_taylor_from_gradient() -> None:
    masks = {}
    for method in ("magnitude", "wanda", "taylor", "gradient"):
        model = _llama()
        _run(model, method, sparsity=0.5)
        masks[method] = model.model.layers[0].self_attn.q_proj.weight != 0
    assert (masks["wanda"] != masks["magnitude"]).float().mean() > 0.05
    assert (masks["taylor"] != masks["gradient"]).float().mean() > 0.05


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_owl_mean_sparsity_exact_and_uneven(method: str) -> None:
    model = _llama()
    with torch.no_grad():  # block 1 gets outlier inputs: OWL must prune it less
        model.model.layers[1].input_layernorm.weight[:2] = 30.0
        model.model.layers[1].post_attention_layernorm.weight[:2] = 30.0
    info = _run(model, method, sparsity=0.6, allocation="owl", owl_lambda=0.1)
    assert abs(info["sparsity"] - 0.6) < 1e-3
    low, high = info["block_sparsity"]
    assert info["outlier_ratio"][1] > info["outlier_ratio"][0]
    assert high == pytest.approx(0.5, abs=1e-6) and low == pytest.approx(0.7, abs=1e-6)


def test_sparsegpt_joint_quant_artifact_round_trip(tmp_path) -> None:
    model = _llama()
    info = _run(model, "sparsegpt", sparsity=0.5, bits=4, group_size=16)
    assert info["sparsity"] == pytest.approx(0.5, abs=1e-6) and info["bits"] == 4
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for q in layers:
        zero = expand_groups(q.zero, q.in_features, q.group_size)
        pruned = q.codes == zero
        assert pruned.sum() >= q.codes.numel() // 2 and bool((q.dequantized_weight()[pruned] == 0).all())
    ids = torch.randint(0, 64, (2, 24))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    save_artifact(model, tmp_path, kind="decoder")
    encodings = {e["encoding"] for k, e in read_manifest(tmp_path)["tensors"].items() if k.endswith(".codes")}
    assert encodings == {"packed_bitmask"}
    loaded, kind = load_artifact(tmp_path)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, before) and kind == "decoder"


def test_taylor_on_encoder_uses_label_free_proxy() -> None:
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4)).eval()
    info = _run(bert, "taylor", _ctx("encoder"), sparsity=0.3)
    assert info["layers"] == 12 and info["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert all(p.requires_grad for p in bert.parameters())  # restored


@pytest.mark.parametrize("method, values, message", [
    ("wanda", {"sparsity": 1.0}, r"sparsity must be in \[0.0, 1.0\)"),
    ("sparsegpt", {"pattern": "3:2"}, "1 <= N < M"),
    ("taylor", {"pattern": "0:4"}, "1 <= N < M"),
    ("magnitude", {"sparsity": 0.5, "pattern": "2:4"}, "exactly one of"),
    ("sparsegpt", {"threshold": 0.1}, "not supported"),
    ("wanda", {"sparsity": 0.5, "scope": "global"}, "scope: global is not supported"),
    ("magnitude", {"pattern": "2:4", "allocation": "owl"}, "allocation: owl"),
    ("sparsegpt", {"sparsity": 0.5, "bits": 9}, "bits must be an integer from 2 to 8"),
    ("wanda", {"sparsity": 0.5, "owl_lambda": 0.7}, "owl_lambda must be in"),
])
def test_bad_values_are_user_errors(method: str, values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config(get_method(method).config_cls, values, method)


def test_unquoted_yaml_pattern_is_explained() -> None:
    from slimformer.recipe import Recipe

    with pytest.raises(UserError, match="quoted string"):
        Recipe.from_yaml("steps: [{method: wanda, pattern: 2:4}]")
    assert Recipe.from_yaml("steps: [{method: wanda, pattern: '2:4'}]").steps[0].config.pattern == "2:4"


def test_pattern_not_dividing_width_and_missing_data_are_user_errors() -> None:
    with pytest.raises(UserError, match="multiple of M=5"):
        _run(_llama(), "magnitude", pattern="2:5")
    with pytest.raises(UserError, match="needs calibration data"):
        _run(_llama(), "wanda", StepContext(), sparsity=0.5)
