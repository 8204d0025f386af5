"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column and compensate each pruned
weight's removal in the not-yet-processed columns through the inverse Hessian of the layer's
inputs, H = 2/n sum x x^T (Optimal Brain Surgeon, one row at a time, all rows sharing H^-1).

The mask is chosen adaptively per block of columns (default 128): within a block, the weights with
the lowest OBS error w^2 / [H^-1]_jj^2 go, measured on the weights as updated so far; with N:M, the
choice is made for each group of M columns when the sweep reaches it. Optionally the kept weights
are quantized in the same sweep (as GPTQ does), pruned weights getting their group's zero point.
Pure tensor functions; the model walking lives in `sparsegpt.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from slimformer.calibrate.hessian_math import inverse_hessian_factor
from slimformer.prune.magnitude_math import check_sparsity, remove_lowest
from slimformer.prune.nm_math import nm_masks
from slimformer.quant.qscheme import QParams, check_scheme, compute_qparams, n_groups, qrange


@dataclass(frozen=True)
class SparseGPTResult:
    """weight: (out, in) fp32 pruned and updated (dequantized when quantized); keep: (out, in) bool;
    codes/qparams: the integer codes and their scales when quantization was asked for."""

    weight: Tensor
    keep: Tensor
    codes: Tensor | None = None
    qparams: QParams | None = None


def _block_size(block_size: int, m: int | None, group_size: int | None) -> int:
    """Columns per block, rounded so that N:M groups and quantization groups never straddle two."""
    size = max(1, block_size)
    if group_size is not None and group_size > 0:
        size = group_size * max(1, size // group_size)
    if m is not None and size % m:
        size = math.lcm(size, m)
    return size


def sparsegpt_prune(
    w: Tensor, h: Tensor, *, sparsity: float | None = None, nm: tuple[int, int] | None = None, damp: float = 0.01,
    block_size: int = 128, bits: int | None = None, group_size: int = 128, symmetric: bool = False,
    hinv: Tensor | None = None,
) -> SparseGPTResult:
    """Prune w (out, in) against the Hessian h (in, in) of its inputs: exactly round(sparsity * numel)
    weights (the count split over column blocks), or n of every m consecutive inputs per row.
    hinv: `inverse_hessian_factor(h, damp)` when the caller already has it (layers sharing h); h
    may then be only H's diagonal (in,), all the walk reads of it."""
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity or nm")
    if sparsity is not None:
        check_sparsity(sparsity)
    if bits is not None:
        check_scheme(bits, group_size)
    out_f, in_f = w.shape
    w = w.detach().float().clone()
    w[:, (h if h.dim() == 1 else torch.diag(h)) == 0] = 0.0  # inputs that never fire: their weights carry no signal
    if hinv is None:
        hinv = inverse_hessian_factor(h, damp)  # upper Cholesky factor of H^-1, fp32
    m = nm[1] if nm is not None else None
    size = _block_size(block_size, m, group_size if bits is not None else None)

    wt = w.t().contiguous()  # (in, out): column j of W is row j here, contiguous
    prune_t = torch.zeros(in_f, out_f, dtype=torch.bool, device=w.device)
    quant = _Quantizer(w, bits, group_size, symmetric) if bits is not None else None
    for i1 in range(0, in_f, size):
        i2 = min(i1 + size, in_f)
        w1 = wt[i1:i2].clone()  # (b, out)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)  # (b,)
        err1 = torch.zeros_like(w1)
        prune1 = prune_t[i1:i2]  # a view: filled in place
        if sparsity is not None:  # this block's share of the exact total count
            k = round(sparsity * i2 * out_f) - round(sparsity * i1 * out_f)
            prune1.copy_(~remove_lowest(w1.pow(2) / d.pow(2).unsqueeze(1), k))
        drop = prune1.float() / d.unsqueeze(1)  # (b, out): a column's OBS error is w * drop (0 where kept)
        for j in range(i2 - i1):  # the OBS sweep is sequential; each step is an (out,)-vector update
            if nm is not None and j % m == 0:  # (m, out) OBS errors of this group, ranked per output row
                err = w1[j : j + m].pow(2) / d[j : j + m].pow(2).unsqueeze(1)
                prune1[j : j + m] = ~nm_masks(err.t(), *nm).t()
                drop[j : j + m] = prune1[j : j + m].float() / d[j : j + m].unsqueeze(1)
            if quant is None:
                e = torch.mul(w1[j], drop[j], out=err1[j])
                w1[j].masked_fill_(prune1[j], 0.0)
            else:
                q = quant.column(i1 + j, w1[j].masked_fill(prune1[j], 0.0), w1[j:], prune1[j:])
                e = torch.div(w1[j] - q, d[j], out=err1[j])
                w1[j] = q
            w1[j + 1 :].addr_(hinv1[j, j + 1 :], e, alpha=-1.0)  # spread the error over later columns
        wt[i1:i2] = w1
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    keep = ~prune_t.t()
    weight = wt.t().contiguous()
    if quant is None:
        return SparseGPTResult(weight, keep)
    codes, qp = quant.result()
    return SparseGPTResult(weight, keep, codes, qp)


class _Quantizer:
    """Column-by-column quantization with per-group scales set from the updated weights when the
    sweep reaches a group (weights already chosen for pruning counted as zeros), as in GPTQ."""

    def __init__(self, w: Tensor, bits: int, group_size: int, symmetric: bool) -> None:
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.qmin, self.qmax = qrange(bits, symmetric)
        out_f, in_f = w.shape
        qp = compute_qparams(w, bits, group_size, symmetric)  # per tensor / per channel: fixed up front
        ng = n_groups(in_f, group_size)
        self.scale = qp.scale.float().expand(out_f, ng).t().contiguous()  # (n_groups, out)
        self.zero = qp.zero.float().expand(out_f, ng).t().contiguous()
        self.codes_t = torch.zeros(in_f, out_f, device=w.device)

    def column(self, col: int, q: Tensor, rest: Tensor, pruned: Tensor) -> Tensor:
        """Quantize column `col` (out,) (pruned entries already 0); `rest`/`pruned` (b, out) are the
        updated weights and prune flags from this column on, for a group that starts here."""
        g = col // self.group_size if self.group_size > 0 else 0
        if self.group_size > 0 and col % self.group_size == 0:
            cols = torch.where(pruned[: self.group_size], torch.zeros_like(rest[: self.group_size]),
                               rest[: self.group_size])  # (G, out)
            fresh = compute_qparams(cols.t(), self.bits, -1, self.symmetric)
            self.scale[g], self.zero[g] = fresh.scale.float()[:, 0], fresh.zero.float()[:, 0]
        code = torch.clamp(torch.round(q / self.scale[g] + self.zero[g]), self.qmin, self.qmax)
        self.codes_t[col] = code  # a pruned weight (0) gets exactly the zero point: 0 lies in every range
        return (code - self.zero[g]) * self.scale[g]

    def result(self) -> tuple[Tensor, QParams]:
        scale, zero = self.scale.t(), self.zero.t()  # (out, n_groups)
        if self.group_size == 0:
            scale, zero = scale[:1], zero[:1]
        qp = QParams(scale.half().contiguous(), zero.to(torch.int16).contiguous(), self.bits, self.group_size,
                     self.symmetric)
        return self.codes_t.t().to(torch.int16).contiguous(), qp
