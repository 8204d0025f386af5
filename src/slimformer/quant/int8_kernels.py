"""Integer matrix products for W8A8 layers.

Weights are 8-bit symmetric per output channel, so y = (x_q @ W_q^T) * s_x * s_w + b is exact
up to the final float scaling. Two integer kernels:
- `torch._int_mm` (int8 x int8 -> int32) for per-token or calibrated per-tensor activation scales.
  On this project's CPU it is slow (~4 GOP/s measured on its AVX2
  machine vs ~120 GFLOP/s fp32), so evaluation can run the same integer product as fp32 matmuls.
- PyTorch's quantized engine (`quantized::linear_dynamic`: fbgemm/oneDNN on x86, QNNPACK on ARM):
  uint8 activations with one asymmetric scale per call, chosen at run time from the input's
  min/max, x int8 per-channel weights, int32 accumulation. This is the fast CPU int8 path.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def int8_matmul(xq: Tensor, w_t: Tensor, s_x: Tensor, s_w: Tensor, bias: Tensor | None) -> Tensor:
    """(tokens, in) int8 @ (in, out) int8 -> (tokens, out) float: acc * s_x * s_w (+ bias).

    s_x: (tokens, 1) or scalar, s_w: (out,) — both fp32. Float xq/w_t (integer-valued) compute
    the same accumulator with an fp32 matmul instead (see `slimformer.layers.set_int_kernel`).
    """
    acc = torch._int_mm(xq, w_t) if xq.dtype == torch.int8 else xq @ w_t  # (tokens, out), exact in int32
    y = acc.float() * s_x * s_w.view(1, -1)
    return y if bias is None else y + bias


def quantize_per_token(x2: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, in) float -> (int8 codes, (tokens, 1) scales), symmetric, 127 levels each side."""
    s_x = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (tokens, 1)
    return torch.round(x2 / s_x).clamp_(-127, 127).to(torch.int8), s_x


def quantize_per_tensor_asym(x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, in) float -> (uint8 codes as float, scale, zero point) over [min(x, 0), max(x, 0)],
    255 steps: the activation quantization `quantized::linear_dynamic` applies (float emulation)."""
    lo, hi = x2.min().clamp(max=0.0), x2.max().clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, 255)
    return torch.round(x2 / scale + zero).clamp_(0, 255), scale, zero


def prepack_int8(codes: Tensor, scale: Tensor, bias: Tensor | None) -> object:
    """(out, in) int8 codes + (out,) scales (+ bias) -> the quantized engine's packed weight."""
    out_features = codes.shape[0]
    with warnings.catch_warnings():  # quantized-tensor creation is deprecated but is this kernel's input format
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            codes.to(torch.int8), scale.double(), torch.zeros(out_features, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())


def packed_dynamic_linear(x2: Tensor, packed: object) -> Tensor:
    """(tokens, in) fp32 -> (tokens, out) fp32 through `quantized::linear_dynamic` (uint8 x int8)."""
    # reduce_range=False keeps the full 8-bit activation range (7-bit halved the MiniLM cosine gain)
    return torch.ops.quantized.linear_dynamic(x2.contiguous(), packed, False)


def quantize_static(x2: Tensor, scale: Tensor) -> Tensor:
    """(tokens, in) float -> int8 codes with one calibrated scale (values beyond the range clip)."""
    return torch.round(x2 / scale).clamp_(-128, 127).to(torch.int8)


def fake_quant_static(x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool) -> Tensor:
    """x quantized with a calibrated per-tensor (scale, zero) and dequantized, in float."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    z = zero.to(x.dtype)
    return (torch.round(x / scale + z).clamp(qmin, qmax) - z) * scale
