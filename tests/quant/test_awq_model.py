"""AWQ through the layer-wise engine on SmolLM2: better perplexity than RTN at W4 g128, and the
per-layer input scales survive the artifact."""

from __future__ import annotations

import copy

import pytest
import torch

from slimformer.artifact import load_artifact, save_artifact
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.errors import UserError
from slimformer.evaluate.perplexity import perplexity
from slimformer.quant.awq import AWQConfig, awq
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn


def test_config_rejects_bad_values() -> None:
    with pytest.raises(UserError, match="awq: grid"):
        AWQConfig(grid=0)
    with pytest.raises(UserError, match="awq"):
        AWQConfig(bits=9)


@pytest.mark.slow
def test_awq_w4_g128_beats_rtn_and_round_trips(smollm_bundle, smollm_windows, tmp_path) -> None:
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    model = copy.deepcopy(smollm_bundle.model)
    info = awq(model, AWQConfig(bits=4, group_size=128, num_samples=8, grid=10, fold=False), ctx)  # a coarser grid: CI time
    assert info["layers"] == 210 and 0 < info["mean_alpha"] < 1 and info["mean_error_vs_rtn"] < 0.9
    assert all(m.input_scale is not None for m in model.modules() if isinstance(m, QuantLinear))
    ppl_awq = perplexity(model, smollm_windows, progress=False)["ppl"]

    (tmp_path / "awq").mkdir()
    save_artifact(model, tmp_path / "awq", kind="decoder")
    reloaded, _ = load_artifact(tmp_path / "awq")
    x = smollm_windows[:1, :128]
    assert torch.equal(model(x).logits, reloaded(x).logits)

    baseline = copy.deepcopy(smollm_bundle.model)
    rtn(baseline, RTNConfig(bits=4, group_size=128))
    ppl_rtn = perplexity(baseline, smollm_windows, progress=False)["ppl"]
    assert ppl_awq < 0.97 * ppl_rtn


@pytest.mark.parametrize("rules", [{"symmetric": True, "scale_rule": "signed_max"}, {"zero_point": "float"}],
                         ids=["signed_max", "float"])
def test_awq_with_llama_cpp_rules_round_trips(smollm_bundle, tmp_path, rules: dict) -> None:
    """Two layers of block 0 on 2 windows of 128 tokens: the rule reaches the layers (input scale and
    float minimum together included) and the artifact reloads them bit for bit."""
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    targets = ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj")
    model = copy.deepcopy(smollm_bundle.model)
    config = AWQConfig(bits=4, group_size=64, num_samples=2, seq_len=128, grid=4, targets=targets, fold=False, **rules)
    info = awq(model, config, ctx)
    assert info["layers"] == 2 and info["mean_error_vs_rtn"] <= 1.0
    layer = model.get_submodule(targets[1])
    assert layer.input_scale is not None and (layer.minimum is not None) == ("zero_point" in rules)
    assert layer.scale_rule == config.scale_rule and layer.zero_point == config.zero_point
    save_artifact(model, tmp_path, kind="decoder")
    reloaded, _ = load_artifact(tmp_path)
    x = torch.arange(100, 164).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, reloaded(x).logits)
