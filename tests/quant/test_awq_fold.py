"""AWQ `fold: true`: shared scales folded into the producing norm/linear leave the float function
unchanged, the quantized layers carry no input_scale, unknown or split groups are refused, and on
SmolLM2 the folded form still beats RTN."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny import tiny_ctx, tiny_llama  # tests/tiny.py

from slimformer.artifact import load_artifact, save_artifact
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.errors import UserError
from slimformer.evaluate.perplexity import perplexity
from slimformer.quant.awq import AWQConfig, awq
from slimformer.quant.awq_fold import can_fold, fold_groups, fold_scale
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn

# measured: SmolLM2 W4 g128, 8 calibration windows, grid 10, the 8 `smollm_windows`: fold:true 32.80, RTN 36.74 (0.893)
FOLD_VS_RTN = 0.95


def _ctx() -> StepContext:
    return tiny_ctx(" ".join(f"sentence {i} about folding scales into tiny random language models" for i in range(60)))


def _llama(kv_heads: int) -> torch.nn.Module:
    model = tiny_llama(hidden_size=32, intermediate_size=64, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                       attention_bias=True, mlp_bias=True)
    with torch.no_grad():  # norms away from 1 and non-zero biases, so that a wrong fold shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_folding_random_scales_keeps_the_logits(kv_heads: int) -> None:
    model = _llama(kv_heads)
    x = _ids()
    with torch.inference_mode():
        before = model(x).logits
    gen = torch.Generator().manual_seed(5)
    folded = 0
    for index, block in enumerate(model.model.layers):
        for group in fold_groups(block, index):
            if can_fold(block, group, index):
                width = block.get_submodule(group.members[0]).in_features
                fold_scale(block, group, torch.rand(width, generator=gen) * 4 + 0.25)  # s in [0.25, 4.25)
                folded += 1
    assert folded == (8 if kv_heads == 4 else 6)  # under GQA v_proj cannot absorb o_proj's scale
    with torch.inference_mode():
        after = model(x).logits
    fresh = _llama(kv_heads).model.layers[0]
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, fresh.input_layernorm.weight)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_fold_leaves_no_input_scale_and_round_trips(kv_heads: int, tmp_path) -> None:
    model = _llama(kv_heads)
    info = awq(model, AWQConfig(bits=4, group_size=16, num_samples=4, seq_len=64, grid=4, fold=True), _ctx())
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert info["fold"] is True and info["layers"] == len(layers) == 14
    assert all(m.input_scale is None for m in layers)
    assert info["unscaled_layers"] == (0 if kv_heads == 4 else 2) and 0 < info["mean_error_vs_rtn"] <= 1.0
    save_artifact(model, tmp_path, kind="decoder")  # the folded norms travel with the codes
    reloaded, _ = load_artifact(tmp_path)
    x = _ids()
    with torch.inference_mode():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_fold_false_still_keeps_input_scales() -> None:
    model = _llama(2)
    awq(model, AWQConfig(bits=4, group_size=16, num_samples=2, seq_len=64, grid=2, fold=False), _ctx())
    assert all(m.input_scale is not None for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize(("targets", "ignore", "message"), [
    (("self_attn.q_proj",), (), "q_proj but not self_attn.k_proj, self_attn.v_proj"),
    (None, ("model.layers.1.mlp.up_proj",), "block 1: the targets select mlp.gate_proj but not mlp.up_proj"),
], ids=["q_without_kv", "gate_without_up"])
def test_fold_refuses_a_split_group(targets, ignore, message: str) -> None:
    model = _llama(2)
    with pytest.raises(UserError, match=message) as err:
        awq(model, AWQConfig(num_samples=2, seq_len=64, fold=True, targets=targets, ignore=ignore), _ctx())
    assert "fold: false" in str(err.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before any change


def test_fold_refuses_an_unknown_block() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(UserError, match="block 0 is a GPT2Block.*fold: false"):
        awq(model, AWQConfig(num_samples=2, seq_len=64, fold=True), _ctx())


def test_fold_auto_folds_llama_blocks_and_falls_back_elsewhere() -> None:
    """The default, fold: auto: folded where the blocks allow it, per-layer input scales (and the
    reason in the step's info) where they do not, e.g. GPT-2 blocks or a split group."""
    assert AWQConfig().fold == "auto"
    llama = _llama(2)
    info = awq(llama, AWQConfig(bits=4, group_size=16, num_samples=2, seq_len=64, grid=2), _ctx())
    assert info["fold"] is True and "fold_auto" not in info
    assert all(m.input_scale is None for m in llama.modules() if isinstance(m, QuantLinear))
    split = _llama(2)
    info = awq(split, AWQConfig(bits=4, group_size=16, num_samples=2, seq_len=64, grid=2,
                                targets=("self_attn.q_proj",)), _ctx())
    assert info["fold"] is False and "q_proj but not self_attn.k_proj" in info["fold_auto"]
    assert all(m.input_scale is not None for m in split.modules() if isinstance(m, QuantLinear))
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()
    info = awq(gpt2, AWQConfig(bits=4, group_size=16, num_samples=2, seq_len=64, grid=2), _ctx())
    assert info["fold"] is False and "GPT2Block" in info["fold_auto"] and info["layers"] > 0


@pytest.mark.slow
def test_fold_w4_g128_beats_rtn_on_smollm(smollm_bundle, smollm_windows) -> None:
    ctx = StepContext(tokenizer=smollm_bundle.tokenizer, calib=load_data("lee-news", "calib"), progress=False)
    model = copy.deepcopy(smollm_bundle.model)
    info = awq(model, AWQConfig(bits=4, group_size=128, num_samples=8, grid=10, fold=True), ctx)
    assert info["layers"] == 210 and info["unscaled_layers"] == 30  # o_proj: 9 heads share 3 kv heads
    assert all(m.input_scale is None for m in model.modules() if isinstance(m, QuantLinear))
    ppl_fold = perplexity(model, smollm_windows, progress=False)["ppl"]
    baseline = copy.deepcopy(smollm_bundle.model)
    rtn(baseline, RTNConfig(bits=4, group_size=128))
    ppl_rtn = perplexity(baseline, smollm_windows, progress=False)["ppl"]
    assert ppl_fold < FOLD_VS_RTN * ppl_rtn
