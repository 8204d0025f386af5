"""Affine (linear) quantization math on tensors: q = clamp(round(w / s) + z), w ~ (q - z) s.

Scales and zero points come from each group's min/max. Groups run along the input dimension:
group_size -1 = one group per output channel (row), 0 = one group for the whole tensor, N > 0 =
groups of N inputs with a smaller last group when N does not divide the width (576 = 4 x 128 + 64).
Scales are rounded *up* to fp16 before the codes are computed, so storing them in fp16 loses
nothing and every weight stays within half a step of its dequantized value.

Dtypes: scale fp16 (out, n_groups), or (1, 1) per tensor; zero int16, same shape; codes int16
(symmetric in [-2^(b-1), 2^(b-1)-1], asymmetric in [0, 2^b-1], so 8-bit asymmetric fits).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimformer.errors import UserError

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QParams:
    """Per-group quantization parameters: scale (out, n_groups) fp16, zero (out, n_groups) int16."""

    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    symmetric: bool


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_scheme(bits: int, group_size: int, method: str | None = None) -> None:
    """UserError unless bits is an integer in 2..8 and group_size is -1, 0 or positive; the message
    starts with `method: ` when a method's config is being checked."""
    where = f"{method}: " if method else ""
    if not _is_int(bits) or not 2 <= int(bits) <= 8:
        raise UserError(f"{where}bits must be an integer from 2 to 8, got {bits!r}.")
    if not _is_int(group_size) or int(group_size) < -1:
        raise UserError(
            f"{where}group_size must be -1 (per output channel), 0 (per tensor) or a positive group size, "
            f"got {group_size!r}."
        )


def check_group_fits(group_size: int, layers: dict[str, nn.Module], where: str) -> None:
    """UserError when a group of `group_size` inputs is wider than a targeted layer: such a group would
    be padded to its full width (time and memory grow with it) and mean per-channel scales anyway."""
    widths = {name: _in_features(m) for name, m in layers.items()}
    name, width = min(widths.items(), key=lambda kv: kv[1])
    if group_size > width:
        raise UserError(f"{where}: group_size {group_size} is larger than layer '{name}', which has {width} inputs; "
                        f"use a group size of at most {width} (a divisor such as {_divisor(width)} keeps groups "
                        "equal), -1 for one scale per output channel, or leave that layer out with `ignore`.")


def _in_features(layer: nn.Module) -> int:
    if hasattr(layer, "in_features"):
        return int(layer.in_features)
    return int(layer.weight.shape[0])  # GPT-2's Conv1D stores (in, out)


def _divisor(width: int) -> int:
    return next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if width % g == 0)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: [-2^(b-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def group_bounds(in_features: int, group_size: int) -> int:
    """Groups per row: 1 for per-channel (-1) and per-tensor (0), ceil(in / N) otherwise.

    With N > 0 every group has N columns except the last, which has in - (n_groups - 1) * N.
    """
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


n_groups = group_bounds  # short alias


def _grouped(w: Tensor, group_size: int, pad: float) -> Tensor:
    """(out, in) -> (out, n_groups, G); the last group is padded with `pad` when G does not divide in."""
    out_f, in_f = w.shape
    g = group_bounds(in_f, group_size)
    if g * group_size == in_f:
        return w.reshape(out_f, g, group_size)  # a view when w is contiguous
    padded = torch.full((out_f, g * group_size), pad, dtype=w.dtype, device=w.device)
    padded[:, :in_f] = w
    return padded.view(out_f, g, group_size)


def _ceil_fp16(scale: Tensor) -> Tensor:
    """Smallest fp16 >= scale (fp32 in); 0 (all-zero group) becomes 1 so nothing divides by 0."""
    s16 = scale.half()  # round to nearest; may underflow to 0 or round down
    up = torch.nextafter(s16, torch.full_like(s16, math.inf))
    s16 = torch.where(s16.float() < scale, up, s16)  # round up instead: the range stays covered
    return torch.where(scale == 0, torch.ones_like(s16), s16)


def compute_qparams(
    w: Tensor, bits: int, group_size: int, symmetric: bool, clip: Tensor | float | None = None
) -> QParams:
    """Min/max scales (fp16) and zero points (int16) for a (out, in) weight.

    clip: optional factor(s) in (0, 1] shrinking each group's range (a scalar, or one per group with
    the scale's shape): weights beyond the shrunk range saturate (see `awq_math.clip_search`)."""
    check_scheme(bits, group_size)
    if w.dim() != 2:
        raise UserError(f"quantization expects a 2-D (out, in) weight, got shape {tuple(w.shape)}.")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise UserError("the weight contains NaN or Inf values and cannot be quantized; check the model checkpoint.")
    qmin, qmax = qrange(bits, symmetric)
    if group_size == 0:  # per tensor: one group over everything, (1, 1)
        lo, hi = w.amin().reshape(1, 1), w.amax().reshape(1, 1)
    elif group_size == -1:  # per output channel: (out, 1)
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:  # (out, n_groups); +inf/-inf padding leaves min/max of the short last group untouched
        lo = _grouped(w, group_size, math.inf).amin(dim=-1)
        hi = _grouped(w, group_size, -math.inf).amax(dim=-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range always includes 0: zeros stay exact
    scale = torch.maximum(hi, -lo) / qmax if symmetric else (hi - lo) / (qmax - qmin)
    if bool((scale > _FP16_MAX).any()):
        raise UserError(
            f"weights up to {float(torch.maximum(hi, -lo).max()):.3g} need a scale above the fp16 maximum "
            f"({_FP16_MAX}) at {bits} bits; use more bits or rescale the model."
        )
    scale = _ceil_fp16(scale)
    if symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int16)
    else:
        zero = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax).to(torch.int16)
    return QParams(scale, zero, int(bits), int(group_size), bool(symmetric))


def expand_groups(t: Tensor, in_features: int, group_size: int) -> Tensor:
    """(out, n_groups) per-group values -> (out, in) per-weight values (last group may be shorter).

    Per tensor ((1, 1)) and per channel ((out, 1)) return a broadcasting view, not a copy.
    """
    if group_size <= 0:
        return t.expand(-1, in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize(w: Tensor, qp: QParams) -> Tensor:
    """Integer codes (out, in) int16: round(w / s + z) clamped to the code range."""
    qmin, qmax = qrange(qp.bits, qp.symmetric)
    in_f = w.shape[1]
    scale = expand_groups(qp.scale.float(), in_f, qp.group_size)  # (out|1, in)
    zero = expand_groups(qp.zero.float(), in_f, qp.group_size)
    return torch.round(w.detach().float() / scale + zero).clamp(qmin, qmax).to(torch.int16)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    """fp32 weights (out, in): (q - zero) * scale, with the fp16 scale cast to fp32."""
    in_f = q.shape[1]
    scale = expand_groups(qp.scale.float(), in_f, qp.group_size)  # (out|1, in)
    zero = expand_groups(qp.zero.float(), in_f, qp.group_size)
    return (q.float() - zero) * scale


def fake_quantize(w: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, QParams]:
    """(dequantized fp32 weight, int16 codes, qparams) in one call."""
    qp = compute_qparams(w, bits, group_size, symmetric)
    q = quantize(w, qp)
    return dequantize(q, qp), q, qp


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2); inf if exact."""
    ref = ref.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)
