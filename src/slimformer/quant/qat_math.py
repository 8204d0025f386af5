"""Quantization-aware training math: fake quantization with a straight-through estimator (STE) and
LSQ-style learnable scales / zero points, on plain tensors.

Fake quantization computes, per group (the groups of `quant/qscheme.py`: -1 per output channel,
0 per tensor, N > 0 groups of N inputs with a smaller last group):

    q = round(clamp(w / s + z, qmin, qmax)),    w_hat = (q - z) * s

with the same float operations as `qscheme.quantize` + `qscheme.dequantize` (clamping before or
after rounding to integer bounds gives the same integer), so at equal
scales and zero points the forward pass is bit-identical to the stored PTQ model. Gradients:

- w (STE): d w_hat / d w = 1 where w / s + z lies inside [qmin, qmax], 0 where it is clipped.
- s (LSQ): round(v) - z - w / s inside the range, qmin - z / qmax - z where clipped (Esser et al.
  2020), times the gradient scale g = 1 / sqrt(n · qmax), n = weights sharing one scale.
- z (LSQ+): 0 inside the range, -s where clipped; z is rounded (STE) to the integer the artifact
  stores, and scaled by g like s.

Scales pass through fp16 in the forward pass (identity gradient) because the artifact stores
them in fp16: what is trained is what gets saved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimformer.quant.qscheme import expand_groups, qrange

_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): a learned scale never reaches 0


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by `g` backward (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x: Tensor, g: float) -> Tensor:  # noqa: D102
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad * ctx.g, None


class _Fp16STE(torch.autograd.Function):
    """Round to the nearest fp16 value (kept in fp32) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.half().float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


def round_ste(x: Tensor) -> Tensor:
    """round(x) whose gradient is passed straight through (d/dx = 1)."""
    return _RoundSTE.apply(x)


def grad_scale(x: Tensor, g: float) -> Tensor:
    """x unchanged, its gradient multiplied by g."""
    return _GradScale.apply(x, g)


def fp16_ste(x: Tensor) -> Tensor:
    """x rounded to fp16 (returned as fp32); the gradient passes straight through."""
    return _Fp16STE.apply(x)


def weights_per_scale(in_features: int, out_features: int, group_size: int) -> int:
    """How many weights share one scale: the whole tensor (0), a row (-1) or a group (N; the
    full group size, the ragged last group is not singled out)."""
    if group_size == 0:
        return in_features * out_features
    return in_features if group_size == -1 else min(group_size, in_features)


def lsq_grad_scale(numel: int, bits: int, symmetric: bool) -> float:
    """LSQ's gradient scale g = 1 / sqrt(numel · qmax) for a scale shared by `numel` weights."""
    return 1.0 / math.sqrt(numel * qrange(bits, symmetric)[1])


def fake_quant_ste(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, symmetric: bool
) -> Tensor:
    """(out, in) weight -> its fake-quantized (out, in) weight, differentiable in w, scale, zero.

    scale, zero: (out, n_groups) or (1, 1) fp32; zero is ignored (taken as 0) when symmetric.
    Gradients follow the module docstring (STE for w, LSQ for scale and zero); apply `grad_scale`
    to scale/zero beforehand for LSQ's gradient scaling, and `fp16_ste` to scale to train exactly
    the fp16 scale the artifact stores.
    """
    qmin, qmax = qrange(bits, symmetric)
    in_f = w.shape[1]
    s = expand_groups(scale.clamp(min=_FP16_TINY), in_f, group_size)  # (out|1, in)
    if symmetric:
        return round_ste(torch.clamp(w / s, qmin, qmax)) * s
    z = expand_groups(torch.clamp(round_ste(zero), qmin, qmax), in_f, group_size)  # integer-valued
    # clamp before rounding (LSQ): zero gradient once w / s + z leaves [qmin, qmax]; with integer
    # bounds the value is that of qscheme's round-then-clamp
    q = round_ste(torch.clamp(w / s + z, qmin, qmax))
    return (q - z) * s


def quant_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int, symmetric: bool) -> Tensor:
    """The int16 codes `fake_quant_ste` rounds to (no gradient): what the artifact stores."""
    qmin, qmax = qrange(bits, symmetric)
    in_f = w.shape[1]
    with torch.no_grad():
        s = expand_groups(scale.float().clamp(min=_FP16_TINY), in_f, group_size)
        z = 0.0 if symmetric else expand_groups(torch.round(zero.float()).clamp(qmin, qmax), in_f, group_size)
        return torch.round(w.float() / s + z).clamp(qmin, qmax).to(torch.int16)
