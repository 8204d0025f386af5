"""ONNX export with a key/value cache: prefill + incremental decode in onnxruntime match PyTorch."""

from __future__ import annotations

import onnx
import pytest
import torch
import transformers
from tiny import tiny_llama  # tests/tiny.py
from transformers import DynamicCache

from slimformer.errors import UserError
from slimformer.export.onnx import OrtModel, export_onnx
from slimformer.quant.rtn import RTNConfig, rtn


def _llama(**extra) -> torch.nn.Module:
    return tiny_llama(hidden_size=40, intermediate_size=72, max_position_embeddings=2048, **extra)


def _decode_errors(model: torch.nn.Module, ort: OrtModel, batch: int, prefill: int, steps: int) -> list[float]:
    """Max |logit error| of the prefill, then of each one-token decode step, ORT vs torch's DynamicCache."""
    ids = torch.randint(0, 64, (batch, prefill + steps), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    errors = []
    past = ort.empty_past(batch)
    with torch.inference_mode():
        for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, prefill + steps)]:
            ref = model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=True).logits
            logits, past = ort.step(ids[:, start:stop], torch.ones(batch, stop, dtype=torch.long), past)
            errors.append((torch.from_numpy(logits) - ref).abs().max().item())
    assert past[0].shape == (batch, 2, prefill + steps, 10)  # (batch, kv heads, context, head dim)
    return errors


def test_fp32_prefill_and_decode_match_torch(tmp_path) -> None:
    model = _llama()
    info = export_onnx(model, "decoder", tmp_path / "kv.onnx", kv_cache=True)
    assert info["kv_cache"] is True
    ort = OrtModel(info["path"])  # kind read from the file: its first output is `logits`
    assert ort.kind == "decoder" and len(ort.past_inputs) == 4
    errors = _decode_errors(model, ort, batch=2, prefill=7, steps=4)
    assert max(errors) < 1e-4, errors
    names = [o.name for o in onnx.load(str(tmp_path / "kv.onnx")).graph.output]
    assert names == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    # an empty past is a plain forward: perplexity etc. can call the same file
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert (ort(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() < 1e-4


def test_int4_decode_uses_matmulnbits(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=16))
    info = export_onnx(model, "decoder", tmp_path / "kv4.onnx", kv_cache=True)
    assert info["layers_swapped"] == 14
    ops = [n.op_type for n in onnx.load(str(tmp_path / "kv4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 14
    assert max(_decode_errors(model, OrtModel(info["path"]), batch=1, prefill=5, steps=3)) < 1e-4


def test_kv_cache_needs_a_decoder(tmp_path) -> None:
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UserError, match="decoder"):
        export_onnx(bert, "encoder", tmp_path / "x.onnx", kv_cache=True)
    assert list(tmp_path.iterdir()) == []


def test_matmul_weight_bytes_counts_what_decode_reads(tmp_path) -> None:
    from slimformer.export.onnx import matmul_weight_bytes

    model = _llama(tie_word_embeddings=False)
    fp32 = matmul_weight_bytes(export_onnx(model, "decoder", tmp_path / "a.onnx")["path"])
    linears = 2 * (40 * 40 * 2 + 40 * 20 * 2 + 40 * 72 * 3)  # q, o; k, v (2 kv heads x 10); gate, up, down
    assert fp32 == 4 * (linears + 64 * 40)  # block linears + lm_head, fp32; the embedding Gather is not read
    rtn(model, RTNConfig(bits=4, group_size=16))
    int4 = matmul_weight_bytes(export_onnx(model, "decoder", tmp_path / "b.onnx")["path"])

    def nbits(out_f: int, in_f: int) -> int:  # blocks of 16 (the last padded): codes, fp32 scales, 4-bit zeros
        blocks = -(-in_f // 16)
        return out_f * (blocks * 8 + blocks * 4 + (blocks + 1) // 2)

    per_block = 2 * nbits(40, 40) + 2 * nbits(20, 40) + 2 * nbits(72, 40) + nbits(40, 72)
    assert int4 == 2 * per_block + 4 * 64 * 40  # the lm_head stays fp32
