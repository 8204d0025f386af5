"""ONNX export: onnxruntime computes what the PyTorch model computes, with OUR integer codes."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn.functional as F
import transformers
from onnx import numpy_helper
from tiny import tiny_llama  # tests/tiny.py

from slimformer.errors import UserError
from slimformer.export.onnx import OrtModel, export_onnx, onnx_ready
from slimformer.layers import emulate_int_mm
from slimformer.quant.dynamic import DynamicConfig, dynamic
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn


def _llama() -> torch.nn.Module:
    return tiny_llama(hidden_size=40, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048)


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _inputs(vocab: int, batch: int = 3, seq: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0  # a padded row: the mask must reach the exported attention
    return ids, mask


def _outputs(model: torch.nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), emulate_int_mm(model):
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if kind == "decoder" else out.last_hidden_state


def _round_trip(model: torch.nn.Module, kind: str, tmp_path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    info = export_onnx(model, kind, tmp_path / "model.onnx")
    ids, mask = _inputs(model.config.vocab_size)
    ort_out = getattr(OrtModel(info["path"], kind)(input_ids=ids, attention_mask=mask),
                      "logits" if kind == "decoder" else "last_hidden_state")
    return _outputs(model, kind, ids, mask), ort_out, info


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_fp32_export_matches_torch(tmp_path, kind: str) -> None:
    model = _llama() if kind == "decoder" else _bert()
    ref, got, info = _round_trip(model, kind, tmp_path)
    assert got.shape == ref.shape  # dynamic batch and sequence: inputs differ from the traced example
    assert (got - ref).abs().max().item() < 1e-4
    assert info["layers_swapped"] == 0 and info["bytes"] == (tmp_path / "model.onnx").stat().st_size


def test_weight_only_3bit_exports_dense_dequantized(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=3, group_size=16))  # 40 = 2 x 16 + 8: a smaller last group
    ref, got, info = _round_trip(model, "decoder", tmp_path)
    assert info["layers_swapped"] == 14
    assert (got - ref).abs().max().item() < 1e-4  # the exact dequantized weights, in fp32


@pytest.mark.parametrize("activations", ["tensor", "token"])
def test_dynamic_int8_export_uses_our_codes(tmp_path, activations: str) -> None:
    model = _bert()
    dynamic(model, DynamicConfig(activations=activations))
    ref, got, info = _round_trip(model, "encoder", tmp_path)
    assert info["layers_swapped"] == 12
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item() > 0.9999
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 12 and "MatMul" in ops  # attention products stay float
    assert ops.count("DynamicQuantizeLinear") == (12 if activations == "tensor" else 0)
    # the int8 weight in the file is our code tensor, transposed: nothing was re-quantized
    layer = model.encoder.layer[0].attention.self.query
    int8 = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert any(a.shape == (32, 32) and torch.equal(torch.tensor(a).t(), layer.codes.to(torch.int8)) for a in int8)


def test_static_w8a8_exports_qdq(tmp_path) -> None:
    model = _bert()
    ref_model = copy.deepcopy(model)
    # static W8A8 from our calibration: build the layers directly with a known activation scale
    for name, module in list(ref_model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".encoder." in f".{name}":
            layer = QuantLinear.from_float(module, bits=8, group_size=-1, symmetric=True)
            q = QuantLinear.from_codes(layer.codes, layer.qparams(), module.bias, act_bits=8, act_symmetric=True)
            q.act_scale.fill_(0.05)
            parent, _, child = name.rpartition(".")
            setattr(ref_model.get_submodule(parent), child, q)
    ref, got, info = _round_trip(ref_model, "encoder", tmp_path)
    assert info["layers_swapped"] == 12
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item() > 0.999
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == 12 and ops.count("DequantizeLinear") == 24


def test_onnx_ready_leaves_the_model_untouched() -> None:
    model = _bert()
    dynamic(model, DynamicConfig())
    ready, swapped = onnx_ready(model)
    assert swapped == 12
    assert isinstance(model.encoder.layer[0].attention.self.query, QuantLinear)
    assert not isinstance(ready.encoder.layer[0].attention.self.query, QuantLinear)


def test_bad_export_arguments(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        export_onnx(_bert(), "encoder", tmp_path / "missing" / "model.onnx")
    with pytest.raises(UserError, match="decoder and encoder"):
        export_onnx(_bert(), "seq2seq", tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_weight_only_exports_matmulnbits(tmp_path, symmetric: bool) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=16, symmetric=symmetric))  # 40 = 2 x 16 + 8; 72 = 4 x 16 + 8
    ref, got, info = _round_trip(model, "decoder", tmp_path)
    assert info["layers_swapped"] == 14
    assert (got - ref).abs().max().item() < 1e-4
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [n.op_type for n in graph.node].count("MatMulNBits") == 14
    dense = _llama()
    rtn(dense, RTNConfig(bits=4, group_size=16, symmetric=symmetric))
    dense_info = export_onnx(dense, "decoder", tmp_path / "dense.onnx", int4=False)
    assert info["bytes"] < dense_info["bytes"]  # the packed codes, not fp32 weights, are in the file


def test_pack_nibbles_low_first() -> None:
    from slimformer.export.onnx_ops import pack_nibbles

    assert pack_nibbles(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]


def test_int4_awq_input_scale_exports(tmp_path) -> None:
    model = _llama()
    torch.manual_seed(2)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            s = torch.rand(module.in_features) + 0.5  # AWQ's per-input-channel scales
            q = QuantLinear.from_float(module, bits=4, group_size=16, symmetric=False, weight=module.weight * s)
            layer = QuantLinear.from_codes(q.codes, q.qparams(), module.bias, input_scaled=True)
            layer.input_scale.copy_(s)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    ref, got, info = _round_trip(model, "decoder", tmp_path)
    assert info["layers_swapped"] == 14
    assert (got - ref).abs().max().item() < 1e-4


def test_int4_int8_compute_sets_accuracy_level(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=16))
    info = export_onnx(model, "decoder", tmp_path / "model.onnx", int4_compute="int8")
    nodes = [n for n in onnx.load(info["path"]).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14
    levels = [onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4] * 14
    ids, mask = _inputs(model.config.vocab_size)
    ref = _outputs(model, "decoder", ids, mask)
    got = OrtModel(info["path"], "decoder")(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    cos = F.cosine_similarity(got[keep], ref[keep], dim=-1)
    assert cos.min().item() > 0.99  # int8 activations per block: close, not exact
    with pytest.raises(UserError, match="int4_compute"):
        export_onnx(model, "decoder", tmp_path / "bad.onnx", int4_compute="int4")
    assert not (tmp_path / "bad.onnx").exists()
