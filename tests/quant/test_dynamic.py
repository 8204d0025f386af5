"""`dynamic`: real int8 x int8 -> int32 products that match the float simulation of the same
quantization, and embeddings close to fp32 on MiniLM."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimformer.data.sources import load_data
from slimformer.evaluate.embedding import embed, mean_cosine
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


def test_dynamic_needs_8bit_symmetric_per_channel() -> None:
    with pytest.raises(ValueError):
        QuantLinear(8, 4, 1, bits=4, group_size=-1, symmetric=True, bias=False, dynamic=True)


def test_minilm_dynamic_cosine(minilm_bundle) -> None:
    texts = list(load_data("tweets", "test").texts[:200])
    ref = embed(minilm_bundle.model, minilm_bundle.tokenizer, texts)
    model = copy.deepcopy(minilm_bundle.model)
    info = dynamic(model, DynamicConfig())
    assert info["layers"] == 6 * 6
    assert mean_cosine(embed(model, minilm_bundle.tokenizer, texts), ref) > 0.98
