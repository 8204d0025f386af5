"""RTN on the real SmolLM2-135M: perplexity against fp32 on the evaluation protocol (docs/design.md, 8 windows)."""

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


@pytest.mark.slow
def test_rtn4_g32_signed_max_beats_absmax(smollm_bundle, smollm_windows) -> None:
    """llama.cpp's Q4_0 rule (d = signed max / -8) uses all 16 codes where absmax / 7 uses 15."""
    import copy

    from slimformer.models.loading import ModelBundle

    ppl = {}
    for rule in ("absmax", "signed_max"):
        bundle = ModelBundle(copy.deepcopy(smollm_bundle.model), None, "decoder", "smollm")
        ppl[rule] = _ppl_after(bundle, smollm_windows, bits=4, group_size=32, symmetric=True, scale_rule=rule)
    assert ppl["signed_max"] < 0.97 * ppl["absmax"], ppl


def test_rtn4_g32_float_minimum_gives_back_smollm_weights(smollm) -> None:
    """SmolLM2's packaged weights were dequantized from Q4_1, so llama.cpp's Q4_1 rule at g32 finds
    their grid again: every quantized layer computes with exactly the original weight (its
    perplexity is fp32's), which the integer zero point does not."""
    import torch

    from slimformer.models.layout import select_linears, weight_view

    originals = {name: weight_view(m).detach().clone() for name, m in select_linears(smollm.model, (), ()).items()}
    rtn(smollm.model, RTNConfig(bits=4, group_size=32, zero_point="float"))
    assert len(originals) == 210
    assert all(torch.equal(smollm.model.get_submodule(n).dequantized_weight(), w) for n, w in originals.items())
