"""The compressed-layer protocol: which layers implement it, and the consumers that rely on it."""

from __future__ import annotations

import torch
from torch import nn

from slimformer.evaluate.size import count_params
from slimformer.layers import CompressedLinear, compressed_layers, is_compressed
from slimformer.quant.lut_linear import LUTLinear
from slimformer.quant.qat_modules import FakeQuantLinear
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import compute_qparams


def _quant(out_f: int = 4, in_f: int = 32) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_float(nn.Linear(in_f, out_f), bits=4, group_size=32, symmetric=False)


def _lut() -> LUTLinear:
    codes = torch.arange(32).reshape(4, 8) % 4
    return LUTLinear.from_codes(codes, torch.tensor([[-1.0, -0.5, 0.5, 1.0]]), None, bits=2, method="codebook")


class _NoPackedLeaves(nn.Module):
    """A layer with codes and a weight but no artifact description: not a compressed layer."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 8, 4
        self.register_buffer("codes", torch.zeros(4, 8, dtype=torch.int16))

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes.float()

    def spec(self) -> dict:
        return {}


def test_stored_layers_implement_the_protocol_and_others_do_not() -> None:
    fake = FakeQuantLinear(torch.randn(4, 32), None, compute_qparams(torch.randn(4, 32), 4, 32, False), lsq=False)
    assert is_compressed(_quant()) and is_compressed(_lut()) and isinstance(_quant(), CompressedLinear)
    assert not is_compressed(nn.Linear(8, 4))
    assert not is_compressed(fake)  # computes with a float weight; counted as a plain linear
    assert not is_compressed(_NoPackedLeaves())


def test_size_counts_codes_through_the_protocol() -> None:
    q = _quant()
    q.codes[0, :16] = q.zero.to(q.codes.dtype)[0, 0]  # 16 codes at the zero point: 16 zero weights
    fake = FakeQuantLinear(torch.randn(4, 32), None, compute_qparams(torch.randn(4, 32), 4, 32, False), lsq=False)
    model = nn.Sequential(q, nn.Linear(32, 4, bias=False), fake)
    assert list(compressed_layers(model)) == ["0"]
    counted = count_params(model)
    bias = q.bias.numel()
    expected_nonzero = int(torch.count_nonzero(q.dequantized_weight())) + bias + 128 + int(
        torch.count_nonzero(fake.latent))
    assert counted["params"] == 128 + bias + 128 + 128  # codes, bias, the Linear, the fake-quant latent
    assert counted["nonzero_params"] == expected_nonzero
