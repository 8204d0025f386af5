"""AWQ (Lin et al., 2023): scale salient input channels up before rounding.

Channels that carry large activations matter most; multiplying their weight columns by
s_j = mean|x_j|^alpha before quantization (and dividing the input by s_j) shrinks their relative
rounding error. alpha is searched on a grid per layer to minimise the layer's output error on
calibration inputs. With `duo`, a second family of candidates also divides by the weight's own
per-channel magnitude, s_j = mean|x_j|^alpha / mean|w_j|^(1 - alpha) (as llm-compressor's
`duo_scaling`), and the better of the two is kept. Then, as the reference implementation's
`auto_clip`, each group's range is shrunk by the factor that minimises that group's share of the
output error (`clip_search`). Pure tensor functions; the model walking lives in `awq.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from slimformer.quant.qscheme import compute_qparams, dequantize, fake_quantize, quantize


def channel_scales(act_mean: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^alpha per input channel, normalised so that max(s) * min(s) = 1."""
    s = act_mean.clamp(min=1e-5).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(w: Tensor, group_size: int) -> Tensor:
    """Per input channel: mean over output rows of |w| relative to its group's max |w| (in,)."""
    a = w.abs().float()
    out_f, in_f = a.shape
    if group_size <= 0:
        peak = a.amax(dim=1, keepdim=True)
    else:  # groups along the input dimension, the last one possibly smaller
        group = (torch.arange(in_f, device=a.device) // group_size).expand(out_f, in_f)
        gmax = torch.zeros(out_f, int(group[0, -1]) + 1, device=a.device).scatter_reduce_(1, group, a, "amax")
        peak = gmax.gather(1, group)
    return (a / peak.clamp(min=1e-12)).mean(dim=0)


def output_error(dw: Tensor, h: Tensor) -> Tensor:
    """Output-error energy of a weight change: sum_t |dW x_t|^2 = tr(dW H dW^T), up to H's scale."""
    return ((dw @ h) * dw).sum()


def awq_search(
    w: Tensor, h: Tensor, act_mean: Tensor, bits: int, group_size: int, symmetric: bool, grid: int = 20,
    duo: bool = True, *, scale_rule: str = "absmax", zero_point: str = "int",
) -> tuple[Tensor, float, float, bool]:
    """Best per-channel scales for w (out, in) given the input second moment h = X^T X (in, in).

    Scoring with h instead of the raw calibration rows makes each candidate cost out*in^2 flops
    however many tokens were seen. Returns (scales (in,), best alpha, error ratio best / RTN, whether
    the duo form won); alpha=0 of the plain family is RTN itself, so the ratio is never above 1.
    scale_rule / zero_point: the `qscheme` parametrization every candidate is rounded with.
    """
    w, h = w.float(), h.float()
    families: list[Tensor | None] = [None] + ([weight_mean(w, group_size)] if duo else [])  # None: plain
    best: tuple[Tensor, float, float, bool] | None = None
    base_err = 0.0
    for w_mean in families:
        is_duo = w_mean is not None
        for i in range(grid + 1):
            alpha = i / grid
            if is_duo and alpha == 1.0:
                continue  # the same candidate as the plain family's alpha = 1
            s = channel_scales(act_mean, alpha)
            if w_mean is not None:
                s = s / w_mean.clamp(min=1e-5).pow(1.0 - alpha)
                s = s / (s.max() * s.min()).sqrt()
            w_hat = fake_quantize(w * s, bits, group_size, symmetric, scale_rule=scale_rule,
                                  zero_point=zero_point)[0] / s
            err = output_error(w_hat - w, h).item()
            if not is_duo and i == 0:
                base_err = err
            if best is None or err < best[2]:
                best = (s, alpha, err, is_duo)
    assert best is not None
    return best[0], best[1], best[2] / base_err if base_err > 0 else 1.0, best[3]


def diagonal_blocks(h: Tensor, group_size: int) -> Tensor:
    """The (G, gs, gs) diagonal blocks of h (in, in) for groups of `group_size` inputs; the short
    last group's block is zero-padded (its padded columns carry no weight)."""
    in_f = h.shape[0]
    g = math.ceil(in_f / group_size)
    pad = g * group_size - in_f
    hp = F.pad(h, (0, pad, 0, pad)).view(g, group_size, g, group_size)
    return hp.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [g, i, j] = h[g*gs + i, g*gs + j]


def clip_search(
    w: Tensor, h: Tensor, bits: int, group_size: int, symmetric: bool, grid: int = 20, max_shrink: float = 0.5, *,
    scale_rule: str = "absmax", zero_point: str = "int",
) -> Tensor | None:
    """Per-group range factors (the scale's shape: (out, n_groups)) in [1 - max_shrink, 1].

    Each (row, group) keeps the factor whose rounding error costs least output energy
    d_g H_gg d_g^T, H_gg being the group's diagonal block of the input second moment (cross-group
    terms ignored, as in AWQ's auto_clip). Factor 1 (plain min/max) is a candidate, so no group
    gets worse by that measure. None for per-tensor quantization. The factor multiplies the
    group's min and max (affine, float minimum) or its signed max (signed_max), as `compute_qparams`.
    """
    if group_size == 0:
        return None
    w, h = w.float(), h.float()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    blocks = diagonal_blocks(h, gs)  # (G, gs, gs)
    n_groups, pad = blocks.shape[0], blocks.shape[0] * gs - in_f
    best = torch.ones(out_f, n_groups, device=w.device)
    best_err = torch.full((out_f, n_groups), math.inf, device=w.device)
    for k in range(int(grid * max_shrink) + 1):
        ratio = 1.0 - k / grid
        qp = compute_qparams(w, bits, group_size, symmetric, clip=ratio, scale_rule=scale_rule, zero_point=zero_point)
        d = F.pad(dequantize(quantize(w, qp), qp) - w, (0, pad)).view(out_f, n_groups, gs)
        err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)  # (out, G)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, ratio), best)
        best_err = torch.where(better, err, best_err)
    return best
