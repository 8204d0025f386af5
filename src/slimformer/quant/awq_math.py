"""AWQ (Lin et al., 2023): scale salient input channels up before rounding.

Channels that carry large activations matter most; multiplying their weight columns by
s_j = mean|x_j|^alpha before quantization (and dividing the input by s_j) shrinks their relative
rounding error. alpha is searched on a grid per layer to minimise the layer's output error on
calibration inputs. Pure tensor functions; the model walking lives in `awq.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.quant.qscheme import fake_quantize


def channel_scales(act_mean: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^alpha per input channel, normalised so that max(s) * min(s) = 1."""
    s = act_mean.clamp(min=1e-5).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(dw: Tensor, h: Tensor) -> Tensor:
    """Output-error energy of a weight change: sum_t |dW x_t|^2 = tr(dW H dW^T), up to H's scale."""
    return ((dw @ h) * dw).sum()


def awq_search(
    w: Tensor, h: Tensor, act_mean: Tensor, bits: int, group_size: int, symmetric: bool, grid: int = 20
) -> tuple[Tensor, float, float]:
    """Best per-channel scales for w (out, in) given the input second moment h = X^T X (in, in).

    Scoring with h instead of the raw calibration rows makes each alpha cost out*in^2 flops however
    many tokens were seen. Returns (scales (in,), best alpha, error ratio best / alpha=0), alpha=0
    being plain RTN (so the ratio is never above 1).
    """
    w, h = w.float(), h.float()
    best: tuple[Tensor, float, float] | None = None
    base_err = 0.0
    for i in range(grid + 1):
        alpha = i / grid
        s = channel_scales(act_mean, alpha)
        w_hat = fake_quantize(w * s, bits, group_size, symmetric)[0] / s
        err = output_error(w_hat - w, h).item()
        if i == 0:
            base_err = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    assert best is not None
    return best[0], best[1], best[2] / base_err if base_err > 0 else 1.0
