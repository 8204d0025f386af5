"""AWQ through the layer-wise engine on SmolLM2: better perplexity than RTN at W4 g128, and the
per-layer input scales survive the artifact."""

from __future__ import annotations

import copy

import pytest
import torch

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.errors import UserError
from slimformer.evaluate.perplexity import perplexity
from slimformer.export.artifact import load_artifact, save_artifact
from slimformer.quant.awq import AWQConfig, awq
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn


def test_config_rejects_bad_values() -> None:
    with pytest.raises(UserError, match="awq: grid"):
        AWQConfig(grid=0)
    with pytest.raises(UserError, match="awq"):
        AWQConfig(bits=9)


def test_awq_w4_g128_beats_rtn_and_round_trips(smollm_bundle, smollm_windows, tmp_path) -> None:
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    model = copy.deepcopy(smollm_bundle.model)
    info = awq(model, AWQConfig(bits=4, group_size=128, num_samples=8, grid=10), ctx)  # a coarser grid: CI time
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
