"""`QuantLinear`: a linear layer whose weight is held as integer codes + per-group scales/zeros.

The forward pass dequantizes (simulated quantization on CPU: real low-bit kernels come through
export). Holding the codes, not float weights, is what lets the artifact store them packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.models.layout import weight_view
from slimformer.quant.qscheme import QParams, compute_qparams, dequantize, quantize


class QuantLinear(nn.Module):
    """y = x dequant(codes)^T + b with codes (out, in), scale/zero (out, n_groups)."""

    is_slimformer_linear = True  # counted as a linear layer by models.layout

    def __init__(
        self, in_features: int, out_features: int, n_groups: int, *, bits: int, group_size: int,
        symmetric: bool, bias: bool,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int16))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.int16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_float(
        cls, module: nn.Module, *, bits: int, group_size: int, symmetric: bool, weight: torch.Tensor | None = None
    ) -> "QuantLinear":
        """Quantize a Linear/Conv1D (or an explicit (out, in) `weight`, e.g. from GPTQ) round-to-nearest."""
        w = weight_view(module) if weight is None else weight
        qp = compute_qparams(w.float(), bits, group_size, symmetric)
        return cls.from_codes(quantize(w.float(), qp), qp, getattr(module, "bias", None))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, qp: QParams, bias: torch.Tensor | None) -> "QuantLinear":
        """Wrap already-computed integer codes and their scales/zeros."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features, out_features, qp.scale.shape[1], bits=qp.bits, group_size=qp.group_size,
            symmetric=qp.symmetric, bias=bias is not None,
        )
        layer.codes.copy_(codes.to(torch.int16))
        layer.scale.copy_(qp.scale.to(torch.float16))
        layer.zero.copy_(qp.zero.to(torch.int16))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().float())
        return layer

    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero, self.bits, self.group_size, self.symmetric)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in) fp32."""
        return dequantize(self.codes, self.qparams())

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}"
        )
