"""GPTQ through the layer-wise engine on SmolLM2: better perplexity than RTN at W4 g128."""

from __future__ import annotations

import copy

import pytest

from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.errors import UserError
from slimformer.evaluate.perplexity import perplexity
from slimformer.quant.gptq import GPTQConfig, gptq
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn


@pytest.mark.slow
def test_gptq_w4_g128_beats_rtn(smollm_bundle, smollm_windows) -> None:
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    model = copy.deepcopy(smollm_bundle.model)
    info = gptq(model, GPTQConfig(bits=4, group_size=128, num_samples=8), ctx)
    assert info["layers"] == 210 and info["calib_windows"] == 8
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 210
    ppl_gptq = perplexity(model, smollm_windows, progress=False)["ppl"]
    model = copy.deepcopy(smollm_bundle.model)
    rtn(model, RTNConfig(bits=4, group_size=128))
    ppl_rtn = perplexity(model, smollm_windows, progress=False)["ppl"]
    assert ppl_gptq < 0.97 * ppl_rtn


def test_gptq_passes_llama_cpp_rules_to_its_layers(smollm_bundle) -> None:
    """The config keys reach every replaced layer (2 windows of 128 tokens, two layers of block 0)."""
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    targets = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
    for rules in ({"symmetric": True, "scale_rule": "signed_max"}, {"zero_point": "float"}):
        model = copy.deepcopy(smollm_bundle.model)
        info = gptq(model, GPTQConfig(bits=4, group_size=64, num_samples=2, seq_len=128, targets=targets, **rules), ctx)
        summary = {k: v for k, v in rules.items() if k != "symmetric"}  # the step summary names the rule
        assert info["layers"] == 2 and info.items() >= summary.items()
        for name in targets:
            layer = model.get_submodule(name)
            assert isinstance(layer, QuantLinear) and layer.spec().items() >= rules.items()
            assert (layer.minimum is not None) == ("zero_point" in rules)
    with pytest.raises(UserError, match="gptq: scale_rule 'signed_max' sets the scale of a symmetric scheme"):
        GPTQConfig(scale_rule="signed_max")
