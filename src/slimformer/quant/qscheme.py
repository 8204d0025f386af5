"""Affine (linear) quantization math on tensors: q = clamp(round(w / s) + z), w ~ (q - z) s.

Scales and zero points come from each group's min/max. Groups run along the input dimension:
group_size -1 = one group per output channel (row), 0 = one group for the whole tensor, N > 0 =
groups of N inputs with a smaller last group when N does not divide the width (576 = 4 x 128 + 64).
Scales are rounded to fp16 *before* the codes are computed, so storing them in fp16 loses nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from slimformer.errors import UserError

_FP16_TINY = 2.0**-14  # smallest normal fp16: keeps scales from underflowing to 0


@dataclass(frozen=True)
class QParams:
    """Per-group quantization parameters: scale (out, n_groups) fp16, zero (out, n_groups) int16."""

    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    symmetric: bool


def check_scheme(bits: int, group_size: int) -> None:
    """UserError unless bits is an integer in 2..8 and group_size is -1, 0 or positive."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(f"bits must be an integer from 2 to 8, got {bits!r}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < -1:
        raise UserError(f"group_size must be -1 (per channel), 0 (per tensor) or a positive size, got {group_size!r}.")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: [-2^(b-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row: 1 for per-channel (-1) and per-tensor (0), ceil(in / N) otherwise."""
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def _grouped(w: Tensor, group_size: int, pad: float) -> Tensor:
    """(out, in) -> (out, n_groups, G), padding the last group with `pad`."""
    out_f, in_f = w.shape
    if group_size <= 0:
        return w.unsqueeze(1)
    g = n_groups(in_f, group_size)
    padded = torch.full((out_f, g * group_size), pad, dtype=w.dtype)
    padded[:, :in_f] = w
    return padded.view(out_f, g, group_size)


def compute_qparams(w: Tensor, bits: int, group_size: int, symmetric: bool) -> QParams:
    """Min/max scales and zero points for a (out, in) weight."""
    check_scheme(bits, group_size)
    w = w.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    if group_size == 0:  # per tensor: one group over everything
        lo = w.min().clamp(max=0).reshape(1, 1)
        hi = w.max().clamp(min=0).reshape(1, 1)
    else:  # (out, n_groups); padding with +inf/-inf leaves min/max untouched
        lo = _grouped(w, group_size, math.inf).amin(dim=-1).clamp(max=0)
        hi = _grouped(w, group_size, -math.inf).amax(dim=-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(hi, -lo) / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    # Round the scale UP to fp16 (fp16 rounding is within 2^-11 relative): a scale rounded down
    # would no longer cover [lo, hi] and clamping would then exceed the scale/2 error bound.
    # All-zero groups get a harmless tiny scale instead of 0.
    scale = (scale * (1 + 2**-10)).clamp(min=_FP16_TINY, max=65504.0).half()
    if symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int16)
    else:
        zero = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax).to(torch.int16)
    return QParams(scale, zero, bits, group_size, symmetric)


def expand_groups(t: Tensor, in_features: int, group_size: int) -> Tensor:
    """(out, n_groups) per-group values -> (out, in) per-weight values."""
    if group_size <= 0:
        return t.expand(-1, in_features)  # (out, 1) or (1, 1): broadcasts over the rows
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize(w: Tensor, qp: QParams) -> Tensor:
    """Integer codes (out, in) int16 (symmetric in [-2^(b-1), 2^(b-1)-1], asymmetric in [0, 2^b-1])."""
    qmin, qmax = qrange(qp.bits, qp.symmetric)
    in_f = w.shape[1]
    scale = expand_groups(qp.scale.float(), in_f, qp.group_size)
    zero = expand_groups(qp.zero.float(), in_f, qp.group_size)
    return torch.round(w.float() / scale + zero).clamp(qmin, qmax).to(torch.int16)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    """fp32 weights (q - zero) * scale, (out, in)."""
    in_f = q.shape[1]
    scale = expand_groups(qp.scale.float(), in_f, qp.group_size)
    zero = expand_groups(qp.zero.float(), in_f, qp.group_size)
    return (q.float() - zero) * scale


def fake_quantize(w: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, QParams]:
    """(dequantized weight, codes, qparams) in one call."""
    qp = compute_qparams(w, bits, group_size, symmetric)
    q = quantize(w, qp)
    return dequantize(q, qp), q, qp


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    noise = (ref.float() - approx.float()).pow(2).sum().item()
    signal = ref.float().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
