"""SparseGPT on the real SmolLM2 (first 3 blocks, few short calibration windows): its weight
reconstruction must leave perplexity well below magnitude pruning's at the same 50% sparsity."""

from __future__ import annotations

import copy

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.evaluate.perplexity import perplexity
from slimformer.prune.magnitude import MagnitudeConfig, magnitude
from slimformer.prune.sparsegpt import SparseGPTConfig, sparsegpt

TARGETS = ("re:layers\\.[0-2]\\.",)  # 21 layers: keeps the sequential column sweep to seconds


def test_sparsegpt_50_beats_magnitude_on_smollm(smollm_bundle, smollm_windows) -> None:
    windows = smollm_windows[:2]
    fp32 = perplexity(smollm_bundle.model, windows, progress=False)["ppl"]
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    model = copy.deepcopy(smollm_bundle.model)
    info = sparsegpt(model, SparseGPTConfig(sparsity=0.5, targets=TARGETS, num_samples=8, seq_len=128), ctx)
    assert info["layers"] == 21 and abs(info["sparsity"] - 0.5) < 1e-6
    ppl_sgpt = perplexity(model, windows, progress=False)["ppl"]
    model = copy.deepcopy(smollm_bundle.model)
    magnitude(model, MagnitudeConfig(sparsity=0.5, targets=TARGETS))
    ppl_mag = perplexity(model, windows, progress=False)["ppl"]
    assert ppl_sgpt - fp32 < 0.7 * (ppl_mag - fp32), (fp32, ppl_sgpt, ppl_mag)
