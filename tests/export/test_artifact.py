"""Artifact save -> load: same logits, packed/bitmask encodings, real byte savings, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from slimformer.api import load
from slimformer.export.artifact import WEIGHTS, save_artifact
from slimformer.prune.magnitude import MagnitudeConfig, magnitude
from slimformer.quant.rtn import RTNConfig, rtn


def _tiny(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(20).remainder(64).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 16, False), (3, -1, True), (8, 0, False)])
def test_quantized_round_trip(tmp_path, bits: int, group_size: int, symmetric: bool) -> None:
    model = _tiny()
    dense_bytes = save_artifact(model, tmp_path, kind="decoder")
    (tmp_path / WEIGHTS).unlink()
    rtn(model, RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    quant_bytes = save_artifact(model, tmp_path, kind="decoder")
    loaded = load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(model))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    enc = manifest["tensors"]["model.layers.0.mlp.up_proj.codes"]
    assert enc["encoding"] == "packed" and enc["bits"] == bits
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    if group_size == 16:  # 40 = 2 x 16 + 8: the smaller last group is recorded
        assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["last_group"] == 8
    # linear weights shrink from 32 bits to `bits` (+ scales); embeddings stay fp32
    assert quant_bytes < dense_bytes


def test_sparse_round_trip_uses_bitmask(tmp_path) -> None:
    model = _tiny(tied=False)
    magnitude(model, MagnitudeConfig(sparsity=0.5))
    save_artifact(model, tmp_path, kind="decoder")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tensors"]["model.layers.1.mlp.down_proj.weight"]["encoding"] == "bitmask"
    assert manifest["tensors"]["lm_head.weight"]["encoding"] == "dense"
    loaded = load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("group_size", [8, 0, -1])
def test_sparse_then_quantized_keeps_zeros(tmp_path, group_size: int) -> None:
    model = _tiny()
    magnitude(model, MagnitudeConfig(sparsity=0.5))
    rtn(model, RTNConfig(bits=4, group_size=group_size, symmetric=False))
    w = model.model.layers[0].mlp.gate_proj.dequantized_weight()
    assert int((w == 0).sum()) >= w.numel() // 2  # the zero point maps 0 to exactly 0
    save_artifact(model, tmp_path, kind="decoder")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    enc = manifest["tensors"]["model.layers.0.mlp.gate_proj.codes"]
    # 1 mask bit + 4 bits for half the weights beats 4 bits for all
    assert enc["encoding"] == "packed_bitmask" and enc["nnz"] <= w.numel() // 2
    assert torch.equal(_logits(load(tmp_path)), _logits(model))


def test_smollm_save_load_same_logits(tmp_path, smollm) -> None:
    rtn(smollm.model, RTNConfig(bits=4, group_size=128))
    size = save_artifact(smollm.model, tmp_path, kind="decoder", tokenizer=smollm.tokenizer)
    assert size == sum((tmp_path / f).stat().st_size for f in (WEIGHTS, "manifest.json", "config.json"))
    # 4-bit linear weights: ~70 MB of the ~540 MB fp32 checkpoint remain (the fp32 embedding dominates)
    assert size < 200e6
    loaded = load(tmp_path)
    ids = torch.arange(1000, 1064).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, smollm.model(input_ids=ids).logits)


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_dynamic_int8_round_trip(tmp_path, activations: str) -> None:
    from slimformer.quant.dynamic import DynamicConfig, dynamic

    model = _tiny()
    dynamic(model, DynamicConfig(activations=activations))
    save_artifact(model, tmp_path, kind="decoder")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert ("act_granularity" in json.dumps(manifest["modules"])) == (activations == "tensor")  # only when not the default
    loaded = load(tmp_path)
    up = loaded.model.layers[0].mlp.up_proj
    assert up.dynamic and up.act_granularity == activations
    assert torch.equal(_logits(loaded), _logits(model))
