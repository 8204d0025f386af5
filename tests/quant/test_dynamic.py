"""`dynamic`: real integer products (`torch._int_mm` per token; PyTorch's quantized engine per
tensor) that match the float simulation of the same quantization, and embeddings close to fp32
on MiniLM."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimformer.data.sources import load_data
from slimformer.evaluate.embedding import embed, mean_cosine
from slimformer.errors import UserError
from slimformer.layers import emulate_int_mm, set_int_kernel
from slimformer.quant.dynamic import DynamicConfig, dynamic
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import sqnr_db


def test_integer_path_equals_float_simulation() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = QuantLinear.from_float(linear, bits=8, group_size=-1, symmetric=True, dynamic=True)
    x = torch.randn(3, 10, 64)
    y = layer(x)
    assert y.shape == (3, 10, 48)
    # the same quantization simulated in float
    s_x = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / s_x).clamp(-127, 127) * s_x
    expected = nn.functional.linear(xq, layer.dequantized_weight(), linear.bias)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-5)
    assert sqnr_db(linear(x).detach(), y.detach()) > 30


def test_per_tensor_kernel_matches_its_float_emulation() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(384, 96)
    layer = QuantLinear.from_float(linear, bits=8, group_size=-1, symmetric=True, dynamic=True, act_granularity="tensor")
    # one-sided inputs (post-GELU/ReLU-like). Without VNNI the x86 kernel sums pairs of u8 x s8
    # products in int16 (vpmaddubsw), which saturates for rare pairs of large codes: not bit-exact
    x = torch.randn(4, 32, 384).clamp(min=0)
    with torch.no_grad():
        y_kernel = layer(x)
        set_int_kernel(layer, False)
        y_float = layer(x)
        # the emulation is asymmetric uint8 over [min(x, 0), max(x)] with 255 steps
        s_x = x.max() / 255
        expected = nn.functional.linear(torch.round(x / s_x).clamp(0, 255) * s_x, layer.dequantized_weight(), linear.bias)
    assert torch.allclose(y_float, expected, rtol=1e-4, atol=1e-4)
    assert sqnr_db(y_float, y_kernel) > 50  # measured 55 dB
    assert sqnr_db(linear(x).detach(), y_kernel) > 35


def test_packed_weight_follows_the_buffers_and_deepcopies() -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(32, 16), bits=8, group_size=-1, symmetric=True, dynamic=True, act_granularity="tensor")
    x = torch.rand(5, 32)
    with torch.no_grad():
        before = layer(x)
        clone = copy.deepcopy(layer)  # the packed cache is not copied, it is rebuilt
        assert torch.equal(clone(x), before)
        layer.bias.add_(1.0)  # an in-place change repacks
        assert torch.allclose(layer(x), before + 1.0, atol=1e-5)


def test_emulate_int_mm_switches_only_int_mm_layers() -> None:
    model = nn.Sequential(
        QuantLinear.from_float(nn.Linear(8, 8), bits=8, group_size=-1, symmetric=True, dynamic=True),
        QuantLinear.from_float(nn.Linear(8, 8), bits=8, group_size=-1, symmetric=True, dynamic=True, act_granularity="tensor"),
    )
    with emulate_int_mm(model) as n:
        assert n == 1 and not model[0].int_kernel and model[1].int_kernel
    assert model[0].int_kernel and model[1].int_kernel


def test_bad_activation_granularity() -> None:
    with pytest.raises(UserError, match="activations must be one of token, tensor"):
        DynamicConfig(activations="channel")
    with pytest.raises(ValueError):
        QuantLinear(8, 4, 1, bits=8, group_size=-1, symmetric=True, bias=False, act_granularity="tensor")


def test_dynamic_needs_8bit_symmetric_per_channel() -> None:
    with pytest.raises(ValueError):
        QuantLinear(8, 4, 1, bits=4, group_size=-1, symmetric=True, bias=False, dynamic=True)


def test_minilm_dynamic_cosine(minilm_bundle) -> None:
    texts = list(load_data("tweets", "test").texts[:200])
    ref = embed(minilm_bundle.model, minilm_bundle.tokenizer, texts)
    cosines = {}
    for activations in ("token", "tensor"):
        model = copy.deepcopy(minilm_bundle.model)
        info = dynamic(model, DynamicConfig(activations=activations))
        assert info["layers"] == 6 * 6
        with emulate_int_mm(model):  # token: the exact fp32 form of _int_mm (slow on CPUs without VNNI)
            cosines[activations] = mean_cosine(embed(model, minilm_bundle.tokenizer, texts), ref)
    # measured: token 0.997, tensor 0.991 (one uint8 scale per call, the quantized engine's kernel)
    assert cosines["token"] > 0.995
    assert 0.985 < cosines["tensor"] < cosines["token"]
