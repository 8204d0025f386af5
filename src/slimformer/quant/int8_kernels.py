"""Integer matrix products for W8A8 layers: int8 activations x int8 weights -> int32 (`torch._int_mm`).

Weights are 8-bit symmetric per output channel, so y = (x_q @ W_q^T) * s_x * s_w + b is exact
up to the final float scaling. Activation scales are per token (dynamic) or one static
per-tensor scale taken from calibration.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def int8_matmul(xq: Tensor, w_t: Tensor, s_x: Tensor, s_w: Tensor, bias: Tensor | None) -> Tensor:
    """(tokens, in) int8 @ (in, out) int8 -> (tokens, out) float: acc * s_x * s_w (+ bias).

    s_x: (tokens, 1) or scalar, s_w: (out,) — both fp32. Float xq/w_t (integer-valued) compute
    the same accumulator with an fp32 matmul instead (see `set_int_kernel`).
    """
    acc = torch._int_mm(xq, w_t) if xq.dtype == torch.int8 else xq @ w_t  # (tokens, out), exact in int32
    y = acc.float() * s_x * s_w.view(1, -1)
    return y if bias is None else y + bias


def quantize_per_token(x2: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, in) float -> (int8 codes, (tokens, 1) scales), symmetric, 127 levels each side."""
    s_x = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (tokens, 1)
    return torch.round(x2 / s_x).clamp_(-127, 127).to(torch.int8), s_x


def quantize_static(x2: Tensor, scale: Tensor) -> Tensor:
    """(tokens, in) float -> int8 codes with one calibrated scale (values beyond the range clip)."""
    return torch.round(x2 / scale).clamp_(-128, 127).to(torch.int8)


def fake_quant_static(x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool) -> Tensor:
    """x quantized with a calibrated per-tensor (scale, zero) and dequantized, in float."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    z = zero.to(x.dtype)
    return (torch.round(x / scale + z).clamp(qmin, qmax) - z) * scale


def set_int_kernel(model: nn.Module, enabled: bool) -> int:
    """Run W8A8 QuantLinear layers of `model` with `torch._int_mm` (True) or with the same integer
    product as fp32 matmuls (False: same numbers up to fp32 rounding, far faster on CPUs whose
    int8 GEMM is slow). Returns how many layers were set."""
    n = 0
    for m in model.modules():
        if hasattr(m, "int_kernel"):
            m.int_kernel = enabled
            n += 1
    return n
