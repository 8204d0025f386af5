"""RTN on the real SmolLM2-135M: perplexity against fp32 on the DESIGN protocol (8 windows)."""

from __future__ import annotations

import math

import pytest

from slimformer.evaluate.perplexity import perplexity
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn


def _ppl_after(smollm, windows, **kw) -> float:
    info = rtn(smollm.model, RTNConfig(**kw))
    assert info["layers"] == 30 * 7
    assert sum(isinstance(m, QuantLinear) for m in smollm.model.modules()) == 30 * 7
    return perplexity(smollm.model, windows, progress=False)["ppl"]


def test_fp32_baseline_matches_peer(smollm_fp32_ppl: float) -> None:
    # The peer's full-split figure is 29.28; the first 8 windows sit in the same range.
    assert 15 < smollm_fp32_ppl < 45


@pytest.fixture(scope="module")
def rtn8_ppl(smollm_bundle, smollm_windows) -> float:
    import copy

    from slimformer.models.loading import ModelBundle

    bundle = ModelBundle(copy.deepcopy(smollm_bundle.model), None, "decoder", "smollm")
    return _ppl_after(bundle, smollm_windows, bits=8, group_size=-1, symmetric=True)


def test_rtn8_per_channel_within_1pct(rtn8_ppl, smollm_fp32_ppl) -> None:
    assert rtn8_ppl / smollm_fp32_ppl < 1.01


def test_rtn4_g128_worse_than_8bit_but_finite(smollm, smollm_windows, smollm_fp32_ppl, rtn8_ppl) -> None:
    # 576 = 4 x 128 + 64: the last group of each row is smaller instead of an error
    ppl = _ppl_after(smollm, smollm_windows, bits=4, group_size=128, symmetric=False)
    assert math.isfinite(ppl)
    assert ppl > rtn8_ppl * 1.02
    assert ppl < smollm_fp32_ppl * 3
