"""Affine (linear) quantization math on tensors: q = clamp(round(w / s) + z), w ~ (q - z) s.

Scales and zero points come from each group's min/max. Groups run along the input dimension:
group_size -1 = one group per output channel (row), 0 = one group for the whole tensor, N > 0 =
groups of N inputs with a smaller last group when N does not divide the width (576 = 4 x 128 + 64).
Scales are rounded *up* to fp16 before the codes are computed, so storing them in fp16 loses
nothing and every weight stays within half a step of its dequantized value.

Dtypes: scale fp16 (out, n_groups), or (1, 1) per tensor; zero int16, same shape; codes int16
(symmetric in [-2^(b-1), 2^(b-1)-1], asymmetric in [0, 2^b-1], so 8-bit asymmetric fits).

Two more parametrizations are llama.cpp's (GGUF Q4_0/Q5_0 and Q4_1/Q5_1 blocks), chosen with
`scale_rule` and `zero_point`:
- symmetric, `scale_rule="signed_max"`: d = (the element of largest |w|, sign kept) / -2^(b-1), so
  that element gets code -2^(b-1) and all 2^b codes are used (absmax / (2^(b-1) - 1) never reaches
  the lowest code). d may be negative; w ~ code * d.
- asymmetric, `zero_point="float"`: d = (max - min) / (2^b - 1) and a float minimum m = min, the
  range *not* widened to include 0 (so exact zeros are not kept); w ~ d * code + m.
For both, codes are computed as llama.cpp's reference quantizers compute them: with the float32
(unrounded) d and m, id = 1/d, code = trunc(w * id + 2^(b-1) + 0.5) - 2^(b-1) (signed_max) or
trunc((w - m) * id + 0.5) (float), i.e. halves round up; then d and m are rounded to nearest fp16
for storage, and the stored fp16 pair is what dequantization uses. So a group quantized here holds
exactly the codes, d and m that `gguf.quants.quantize` writes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from slimformer.errors import UserError

_FP16_MAX = 65504.0

ScaleRule = Literal["absmax", "signed_max"]  # symmetric schemes: absmax / (2^(b-1) - 1), or llama.cpp's Q4_0
ZeroPoint = Literal["int", "float"]  # asymmetric schemes: integer zero point, or llama.cpp's Q4_1 float minimum
SCALE_RULES: tuple[str, ...] = ("absmax", "signed_max")
ZERO_POINTS: tuple[str, ...] = ("int", "float")


@dataclass(frozen=True)
class QParams:
    """Per-group quantization parameters: scale (out, n_groups) fp16, zero (out, n_groups) int16.

    minimum: (out, n_groups) fp16 for `zero_point="float"` (w = scale * code + minimum), else None;
    zero is then all 0 and unused, as it is for `scale_rule="signed_max"` (whose scale may be < 0).
    encoding: the float32 (1/d, m) pair codes are computed from under the llama.cpp rules (d and m
    before fp16 rounding, see the module docstring); None derives it from the stored fp16 values.
    """

    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    symmetric: bool
    minimum: Tensor | None = None
    scale_rule: str = "absmax"
    zero_point: str = "int"
    encoding: tuple[Tensor, Tensor] | None = None

    @property
    def rule(self) -> str:
        """"affine" (integer zero point, 0 when symmetric), "signed_max" or "float" (float minimum)."""
        return rule_of(self.scale_rule, self.zero_point)

    def encoder(self) -> tuple[Tensor, Tensor]:
        """fp32 (out, n_groups) pair codes are computed from: (scale, zero) for affine, (1/d, 0) for
        signed_max, (1/d, m) for float (see `encode`)."""
        if self.rule == "affine":
            return self.scale.float(), self.zero.float()
        if self.encoding is not None:
            return self.encoding
        d = self.scale.float()
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        return inv, (self.minimum.float() if self.rule == "float" else torch.zeros_like(d))

    def decoder(self) -> tuple[Tensor, Tensor]:
        """fp32 (out, n_groups) pair the weights are rebuilt from: (scale, zero), or (scale, minimum)
        for float (see `decode`)."""
        return self.scale.float(), (self.minimum.float() if self.rule == "float" else self.zero.float())


def rule_of(scale_rule: str, zero_point: str) -> str:
    """The parametrization named by a (scale_rule, zero_point) pair, as `QParams.rule`."""
    return "signed_max" if scale_rule == "signed_max" else "float" if zero_point == "float" else "affine"


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_bits(bits: object, what: str) -> None:
    """UserError unless `bits` is an integer from 2 to 8 (the widths every scheme supports);
    `what` names the key in the message ("gptq: bits", "a_bits")."""
    if not _is_int(bits) or not 2 <= int(bits) <= 8:
        raise UserError(f"{what} must be an integer from 2 to 8, got {bits!r}.")


def check_scheme(
    bits: int, group_size: int, method: str | None = None, *, symmetric: bool | None = None,
    scale_rule: str = "absmax", zero_point: str = "int",
) -> None:
    """UserError unless bits is an integer in 2..8 and group_size is -1, 0 or positive, and the
    scale_rule / zero_point are known and fit `symmetric` (signed_max is a symmetric rule, a float
    zero point an asymmetric one); the message starts with `method: ` when a method's config is
    being checked."""
    where = f"{method}: " if method else ""
    if scale_rule not in SCALE_RULES:
        raise UserError(f"{where}scale_rule must be one of {', '.join(SCALE_RULES)}, got {scale_rule!r}.")
    if zero_point not in ZERO_POINTS:
        raise UserError(f"{where}zero_point must be one of {', '.join(ZERO_POINTS)}, got {zero_point!r}.")
    if scale_rule != "absmax" and symmetric is False:
        raise UserError(f"{where}scale_rule {scale_rule!r} sets the scale of a symmetric scheme; add symmetric: true "
                        "(or use zero_point: float for llama.cpp's asymmetric Q4_1/Q5_1 rounding).")
    if zero_point != "int" and symmetric is True:
        raise UserError(f"{where}zero_point {zero_point!r} is for asymmetric schemes; set symmetric: false "
                        "(or use scale_rule: signed_max for llama.cpp's symmetric Q4_0/Q5_0 rounding).")
    check_bits(bits, f"{where}bits")
    if not _is_int(group_size) or int(group_size) < -1:
        raise UserError(
            f"{where}group_size must be -1 (per output channel), 0 (per tensor) or a positive group size, "
            f"got {group_size!r}."
        )


def rule_info(config: object) -> dict[str, str]:
    """A method config's `scale_rule` / `zero_point` when not the default, for its step summary
    (so summaries of the default schemes stay as they were)."""
    info = {"scale_rule": getattr(config, "scale_rule", "absmax"), "zero_point": getattr(config, "zero_point", "int")}
    return {k: v for k, v in info.items() if v not in ("absmax", "int")}


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


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row: 1 for per-channel (-1) and per-tensor (0), ceil(in / N) otherwise.

    With N > 0 every group has N columns except the last, which has in - (n_groups - 1) * N.
    """
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)



def _grouped(w: Tensor, group_size: int, pad: float) -> Tensor:
    """(out, in) -> (out, n_groups, G); the last group is padded with `pad` when G does not divide in."""
    out_f, in_f = w.shape
    g = n_groups(in_f, group_size)
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
    w: Tensor, bits: int, group_size: int, symmetric: bool, clip: Tensor | float | None = None, *,
    scale_rule: str = "absmax", zero_point: str = "int",
) -> QParams:
    """Min/max scales (fp16) and zero points (int16) for a (out, in) weight; with scale_rule
    "signed_max" or zero_point "float", llama.cpp's parametrizations (see the module docstring).

    clip: optional factor(s) in (0, 1] shrinking each group's range (a scalar, or one per group with
    the scale's shape): weights beyond the shrunk range saturate (see `awq_math.clip_search`)."""
    check_scheme(bits, group_size, symmetric=symmetric, scale_rule=scale_rule, zero_point=zero_point)
    if w.dim() != 2:
        raise UserError(f"quantization expects a 2-D (out, in) weight, got shape {tuple(w.shape)}.")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise UserError("the weight contains NaN or Inf values and cannot be quantized; check the model checkpoint.")
    if rule_of(scale_rule, zero_point) == "signed_max":
        return _signed_max_qparams(w, bits, group_size, clip)
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = _min_max(w, group_size)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    if zero_point == "float":
        return _float_min_qparams(lo, hi, bits, group_size)
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


def _min_max(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Per-group (min, max) of a (out, in) fp32 weight: (1, 1), (out, 1) or (out, n_groups)."""
    if group_size == 0:  # per tensor: one group over everything
        return w.amin().reshape(1, 1), w.amax().reshape(1, 1)
    if group_size == -1:  # per output channel
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    # +inf/-inf padding leaves min/max of the short last group untouched
    return _grouped(w, group_size, math.inf).amin(dim=-1), _grouped(w, group_size, -math.inf).amax(dim=-1)


def _signed_max_qparams(w: Tensor, bits: int, group_size: int, clip: Tensor | float | None) -> QParams:
    """llama.cpp's Q4_0/Q5_0 rule: d = (the element of largest |w|, sign kept) / -2^(b-1)."""
    if group_size == 0:
        groups = w.reshape(1, 1, -1)
    elif group_size == -1:
        groups = w.unsqueeze(1)  # (out, 1, in)
    else:
        groups = _grouped(w, group_size, 0.0)  # 0-padding never wins the |w| comparison over a real weight
    # argmax takes the first of equal |w|, as numpy's argmax in llama.cpp's reference does
    peak = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # (out|1, n_groups)
    if clip is not None:
        peak = peak * clip
    d = peak / -(2 ** (bits - 1))
    scale = _fp16_or_refuse(d, bits, "scale")
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    zero = torch.zeros_like(scale, dtype=torch.int16)
    return QParams(scale, zero, int(bits), int(group_size), True, scale_rule="signed_max",
                   encoding=(inv, torch.zeros_like(d)))


def _float_min_qparams(lo: Tensor, hi: Tensor, bits: int, group_size: int) -> QParams:
    """llama.cpp's Q4_1/Q5_1 rule: d = (max - min) / (2^b - 1), m = min, the range not widened to 0."""
    d = (hi - lo) / (2**bits - 1)
    scale, minimum = _fp16_or_refuse(d, bits, "scale"), _fp16_or_refuse(lo, bits, "minimum")
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    zero = torch.zeros_like(scale, dtype=torch.int16)
    return QParams(scale, zero, int(bits), int(group_size), False, minimum=minimum, zero_point="float",
                   encoding=(inv, lo))


def _fp16_or_refuse(t: Tensor, bits: int, what: str) -> Tensor:
    """t (fp32) rounded to the nearest fp16, as llama.cpp stores d and m; UserError past fp16's range."""
    if bool((t.abs() > _FP16_MAX).any()):
        raise UserError(f"a group needs a {what} of {float(t.abs().max()):.3g}, above the fp16 maximum ({_FP16_MAX}) "
                        f"at {bits} bits; use more bits or rescale the model.")
    return t.half()


def expand_groups(t: Tensor, in_features: int, group_size: int) -> Tensor:
    """(out, n_groups) per-group values -> (out, in) per-weight values (last group may be shorter).

    Per tensor ((1, 1)) and per channel ((out, 1)) return a broadcasting view, not a copy.
    """
    if group_size <= 0:
        return t.expand(-1, in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def encode(w: Tensor, enc: tuple[Tensor, Tensor], bits: int, symmetric: bool, rule: str) -> Tensor:
    """Integer-valued fp32 codes of w under `enc` (`QParams.encoder()`), broadcasting against w.

    affine (scale, zero): clamp(round(w / scale + zero)), halves to even. signed_max (1/d, 0) and
    float (1/d, m): llama.cpp's trunc(w * id + 2^(b-1) + 0.5) - 2^(b-1) and trunc((w - m) * id + 0.5),
    clamped, in that order of float32 operations, so the codes are the reference quantizer's."""
    a, b = enc
    if rule == "affine":
        return torch.round(w / a + b).clamp(*qrange(bits, symmetric))
    if rule == "signed_max":
        half = 2 ** (bits - 1)
        return torch.trunc(w * a + (half + 0.5)).clamp(0, 2**bits - 1) - half
    return torch.trunc((w - b) * a + 0.5).clamp(0, 2**bits - 1)


def decode(q: Tensor, dec: tuple[Tensor, Tensor], rule: str) -> Tensor:
    """fp32 weights from codes q and `dec` (`QParams.decoder()`): (q - zero) * scale, or
    scale * q + minimum for the float rule (llama.cpp's d * q + m)."""
    a, b = dec
    return a * q + b if rule == "float" else (q - b) * a


def quantize(w: Tensor, qp: QParams) -> Tensor:
    """Integer codes (out, in) int16: round(w / s + z) clamped to the code range (see `encode`)."""
    in_f = w.shape[1]
    enc = tuple(expand_groups(t, in_f, qp.group_size) for t in qp.encoder())  # (out|1, in) each
    return encode(w.detach().float(), enc, qp.bits, qp.symmetric, qp.rule).to(torch.int16)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    """fp32 weights (out, in): (q - zero) * scale, with the fp16 scale cast to fp32 (see `decode`)."""
    in_f = q.shape[1]
    dec = tuple(expand_groups(t, in_f, qp.group_size) for t in qp.decoder())  # (out|1, in) each
    return decode(q.float(), dec, qp.rule)


def fake_quantize(
    w: Tensor, bits: int, group_size: int, symmetric: bool, *, scale_rule: str = "absmax", zero_point: str = "int"
) -> tuple[Tensor, Tensor, QParams]:
    """(dequantized fp32 weight, int16 codes, qparams) in one call."""
    qp = compute_qparams(w, bits, group_size, symmetric, scale_rule=scale_rule, zero_point=zero_point)
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
