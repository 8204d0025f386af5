"""QuantLinear under llama.cpp's parametrizations: its buffers and spec, and the forms it takes in
ONNX (MatMulNBits for signed_max, the exact dequantized weight for a float minimum) and in a plain
Hugging Face copy (both dequantized exactly)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama  # tests/tiny.py

from slimformer.export.hf import dense_copy
from slimformer.export.onnx_ops import OnnxInt4Linear, export_form
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import fake_quantize
from slimformer.quant.rtn import RTNConfig, rtn

SIGNED = {"symmetric": True, "scale_rule": "signed_max"}
FLOAT = {"symmetric": False, "zero_point": "float"}


def _llama() -> torch.nn.Module:
    return tiny_llama(hidden_size=40, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048)


def _linear() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(96, 8)


def test_signed_max_layer_buffers_and_spec() -> None:
    layer = QuantLinear.from_float(_linear(), bits=4, group_size=32, **SIGNED)
    assert layer.minimum is None and "minimum" not in layer.state_dict()
    assert bool((layer.scale < 0).any()) and bool((layer.zero == 0).all())  # d keeps the extreme weight's sign
    assert int(layer.codes.min()) == -8
    assert torch.equal(layer.dequantized_weight(), layer.codes.float() * layer.scale.float().repeat_interleave(32, 1))
    spec = layer.spec()
    assert spec["scale_rule"] == "signed_max" and "zero_point" not in spec and spec["symmetric"] is True
    rebuilt = QuantLinear.from_spec(spec)
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt.dequantized_weight(), layer.dequantized_weight())


def test_float_minimum_layer_buffers_and_spec() -> None:
    linear = _linear()
    layer = QuantLinear.from_float(linear, bits=5, group_size=32, **FLOAT)
    assert layer.minimum.dtype == torch.float16 and tuple(layer.minimum.shape) == (8, 3)
    assert "minimum" in layer.state_dict() and bool((layer.zero == 0).all())
    d, m = layer.scale.float().repeat_interleave(32, 1), layer.minimum.float().repeat_interleave(32, 1)
    expected = d * layer.codes.float() + m
    assert torch.equal(layer.dequantized_weight(), expected)  # w = d * code + m with the stored fp16 d, m
    assert torch.equal(layer.dequantized_weight(), fake_quantize(linear.weight, 5, 32, False, zero_point="float")[0])
    spec = layer.spec()
    assert spec["zero_point"] == "float" and "scale_rule" not in spec
    rebuilt = QuantLinear.from_spec(spec)
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt.dequantized_weight(), layer.dequantized_weight())
    assert "scale_rule" not in QuantLinear.from_float(linear, bits=4, group_size=32, symmetric=False).spec()


def test_inconsistent_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        QuantLinear(8, 4, 1, bits=4, group_size=-1, symmetric=False, bias=False, scale_rule="signed_max")
    with pytest.raises(ValueError, match="do not fit"):
        QuantLinear(8, 4, 1, bits=4, group_size=-1, symmetric=True, bias=False, zero_point="float")
    with pytest.raises(ValueError, match="dynamic"):
        QuantLinear(8, 4, 1, bits=8, group_size=-1, symmetric=True, bias=False, dynamic=True, scale_rule="signed_max")


@pytest.mark.parametrize("rules, native", [(SIGNED, True), (FLOAT, False)], ids=["signed_max", "float"])
def test_onnx_export_forms_compute_the_same(tmp_path, rules: dict, native: bool) -> None:
    from slimformer.export.onnx import OrtModel, export_onnx

    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=16, **rules))
    layer = model.model.layers[0].mlp.up_proj
    form = export_form(layer)
    assert isinstance(form, OnnxInt4Linear) == native  # a float minimum has no exact MatMulNBits form
    if not native:
        assert torch.equal(form.weight, layer.dequantized_weight())
    info = export_onnx(model, "decoder", tmp_path / "model.onnx")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    got = OrtModel(info["path"], "decoder")(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
    assert info["layers_swapped"] == 14 and (got - ref).abs().max().item() < 1e-4  # negative d included


@pytest.mark.parametrize("rules", [SIGNED, FLOAT], ids=["signed_max", "float"])
def test_hf_dense_copy_is_exact(rules: dict) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=16, **rules))
    dense, notes = dense_copy(model)
    assert len(notes["dequantized"]) == 14
    ids = torch.arange(24).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(dense(input_ids=ids).logits, model(input_ids=ids).logits)
