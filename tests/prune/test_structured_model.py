"""Structured pruning on tiny random Llama (GQA) and BERT models: the physically smaller model
computes exactly what the full model computes with the same heads/neurons/blocks masked."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny import CharTokenizer, tiny_ctx, tiny_llama  # tests/tiny.py

from slimformer.config import build_config
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.structure import block_parts
from slimformer.prune.structured import HeadsConfig, LayersConfig, NeuronsConfig, heads, layers, neurons
from slimformer.prune.structured_scores import (
    _identity, activation_neuron_scores, gates, information_scores, taylor_scores,
)

HIDDEN, HEADS, KV, FFN = 32, 8, 2, 48
D = HIDDEN // HEADS


def _llama(layers: int = 3) -> transformers.PreTrainedModel:
    return tiny_llama(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV, max_position_embeddings=128, eos_token_id=None, bos_token_id=None,
                      pad_token_id=0)


def _bert() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _ctx(kind: str = "decoder") -> StepContext:
    return tiny_ctx("the quick brown fox jumps over the lazy dog. " * 40, kind, CharTokenizer(first=1))


IDS = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _masked(model: torch.nn.Module, unit: str, removed: dict[int, list[int]]) -> torch.Tensor:
    with gates(block_parts(model), unit) as gs:
        with torch.no_grad():
            for layer, units in removed.items():
                gs[layer][units] = 0.0
        return _out(model)


@pytest.mark.parametrize("gqa", ["within", "groups"])
def test_llama_heads_equal_masked_model(gqa: str) -> None:
    model = _llama()
    pruned = copy.deepcopy(model)
    info = heads(pruned, HeadsConfig(sparsity=0.25, score="magnitude", gqa=gqa))
    removed = {int(k): v for k, v in info["removed_heads"].items()}
    torch.testing.assert_close(_out(pruned), _masked(model, "heads", removed), atol=1e-5, rtol=1e-5)
    n_q = sum(len(v) for v in removed.values())
    n_kv = n_q // (HEADS // KV) if gqa == "groups" else 0
    assert n_q == (12 if gqa == "groups" else 6)  # 25% of 8 heads: 1 group of 4 (rounded) / 2 heads
    assert info["params_before"] - info["params_after"] == n_q * 2 * D * HIDDEN + n_kv * 2 * D * HIDDEN
    for p in block_parts(pruned):
        assert p.attention.num_key_value_groups == p.heads // p.kv_heads


def test_bert_heads_and_neurons_equal_masked_model() -> None:
    model = _bert()
    pruned = copy.deepcopy(model)
    info = heads(pruned, HeadsConfig(sparsity=0.5, score="magnitude"))
    removed = {int(k): v for k, v in info["removed_heads"].items()}
    torch.testing.assert_close(_out(pruned), _masked(model, "heads", removed), atol=1e-5, rtol=1e-5)
    bd = HIDDEN // 4  # BERT head size
    assert info["params_before"] - info["params_after"] == 4 * (3 * bd * (HIDDEN + 1) + bd * HIDDEN)
    assert [p.attention.num_attention_heads for p in block_parts(pruned)] == [2, 2]

    before = copy.deepcopy(pruned)
    info = neurons(pruned, NeuronsConfig(sparsity=0.25, score="magnitude"))
    mlp = [p.mlp_in[0].weight for p in block_parts(pruned)]
    assert [w.shape[0] for w in mlp] == [40, 40]  # 36 rounded to a multiple of 8
    assert info["params_before"] - info["params_after"] == 2 * 8 * (HIDDEN + 1 + HIDDEN)
    kept = [_kept_rows(b.mlp_in[0].weight, a.mlp_in[0].weight) for a, b in zip(block_parts(pruned), block_parts(before))]
    removed = {i: sorted(set(range(FFN)) - set(k)) for i, k in enumerate(kept)}
    torch.testing.assert_close(_out(pruned), _masked(before, "neurons", removed), atol=1e-5, rtol=1e-5)


def _kept_rows(full: torch.Tensor, small: torch.Tensor) -> list[int]:
    """Which rows of `full` survive in `small` (rows are unique for random weights)."""
    match = (full[None, :, :] == small[:, None, :]).all(-1)  # (small, full)
    return match.float().argmax(1).tolist()


def test_llama_gated_neurons_equal_masked_model_and_exact_counts() -> None:
    model = _llama()
    pruned = copy.deepcopy(model)
    info = neurons(pruned, NeuronsConfig(sparsity=0.5, score="activation", multiple_of=1), _ctx())
    assert pruned.config.intermediate_size == 24
    assert info["params_before"] - info["params_after"] == 3 * 24 * 3 * HIDDEN  # gate, up rows + down cols
    removed = {}
    for i, (a, b) in enumerate(zip(block_parts(pruned), block_parts(model))):
        kept = _kept_rows(b.get("mlp_out").weight.t(), a.get("mlp_out").weight.t())
        assert kept == _kept_rows(b.mlp_in[0].weight, a.mlp_in[0].weight) == _kept_rows(b.mlp_in[1].weight, a.mlp_in[1].weight)
        removed[i] = sorted(set(range(FFN)) - set(kept))
    torch.testing.assert_close(_out(pruned), _masked(model, "neurons", removed), atol=1e-5, rtol=1e-5)


def test_layers_drop_equals_skipping_blocks_and_generates_with_cache() -> None:
    model = _llama(layers=4)
    pruned = copy.deepcopy(model)
    info = layers(pruned, LayersConfig(num_layers=2, score="ppl", num_samples=2, seq_len=16), _ctx())
    dropped = info["layers_removed"]
    assert len(dropped) == 2 and pruned.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in pruned.model.layers] == [0, 1]
    handles = [model.model.layers[i].register_forward_hook(_identity, with_kwargs=True) for i in dropped]
    try:
        expected = _out(model)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(_out(pruned), expected, atol=1e-5, rtol=1e-5)
    _check_generate(pruned)


def test_heads_then_layers_generate_with_kv_cache() -> None:
    model = _llama()
    heads(model, HeadsConfig(sparsity=0.25, scope="global", score="taylor", num_samples=2, seq_len=16), _ctx())
    layers(model, LayersConfig(sparsity=0.34, num_samples=2, seq_len=16), _ctx())
    assert model.config.num_hidden_layers == 2
    _check_generate(model)


def _check_generate(model: torch.nn.Module) -> None:
    """Greedy decoding with the KV cache gives the same tokens as recomputing without it."""
    cached = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, IDS.shape[1] + 6)
    assert torch.equal(cached, plain)


def test_data_scores_find_a_dead_head_and_neuron() -> None:
    model = _llama()
    parts = block_parts(model)
    with torch.no_grad():
        parts[1].get("o").weight[:, 2 * D:3 * D] = 0  # head 2 of block 1 writes nothing
        parts[0].get("mlp_out").weight[:, 5] = 0  # neuron 5 of block 0 writes nothing
    windows = torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    taylor = taylor_scores(model, parts, "heads", windows, "decoder")
    info = information_scores(model, parts, windows, "decoder")
    assert float(taylor[1][2]) == 0.0 and float(taylor[1].min(0).values) == 0.0 and float(taylor[0].min()) > 0
    assert abs(float(info[1][2])) < 1e-9 and float(info[0].min()) > 0
    assert all(p.requires_grad for p in model.parameters())  # restored
    act = activation_neuron_scores(model, parts, windows)
    grad = taylor_scores(model, parts, "neurons", windows, "decoder")
    assert int(act[0].argmin()) == 5 and float(act[0][5]) == 0.0 and float(act[0].sort().values[1]) > 0
    assert int(grad[0].argmin()) == 5 and float(grad[0][5]) == 0.0
    bert = _bert()
    enc = taylor_scores(bert, block_parts(bert), "heads", windows, "encoder")
    assert all(float(s.min()) > 0 for s in enc)


def test_bad_values_are_user_errors() -> None:
    with pytest.raises(UserError, match=r"sparsity must be in \[0.0, 1.0\)"):
        build_config(HeadsConfig, {"sparsity": 1.0}, "step 1 (heads)")
    with pytest.raises(UserError, match="unknown key"):
        build_config(NeuronsConfig, {"sparsity": 0.2, "amount": 0.3}, "step 1 (neurons)")
    with pytest.raises(UserError, match="required"):
        build_config(HeadsConfig, {}, "step 1 (heads)")
    with pytest.raises(UserError, match="exactly one"):
        LayersConfig(num_layers=1, sparsity=0.2)
    with pytest.raises(UserError, match="remove 3 of the model's 3 blocks"):
        layers(_llama(), LayersConfig(num_layers=3), _ctx())
    with pytest.raises(UserError, match="at most"):
        heads(_llama(), HeadsConfig(sparsity=0.9, score="magnitude", gqa="groups"))
    with pytest.raises(UserError, match="needs calibration data"):
        heads(_llama(), HeadsConfig(sparsity=0.5))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(UserError, match="GPT2LMHeadModel is not supported"):
        heads(gpt2, HeadsConfig(sparsity=0.5, score="magnitude"))
