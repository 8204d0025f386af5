"""The Hessian of a linear layer's inputs, H = 2/n sum x x^T, and the factor of its inverse that
GPTQ and SparseGPT both walk. Pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulate_hessian(
    h: Tensor | None, x: Tensor, count: int, weights: Tensor | None = None
) -> tuple[Tensor, int]:
    """Running mean of 2 x^T x over token rows x (tokens, in), each row optionally weighted
    (weights: (tokens,)); returns (H fp32, tokens seen). `h` is updated in place (at 14336 wide, a
    copy beside it and the update is 0.8 GB more)."""
    x = x.float()
    if weights is not None:
        x = x * weights.sqrt().unsqueeze(1)
    new = x.shape[0]
    total = count + new
    update = gram(x).mul_(2.0 / total)
    h = update if h is None else h.mul_(count / total).add_(update)
    return h, total


def gram(x: Tensor, parts: int = 4) -> Tensor:
    """x^T x (in, in) of rows x (tokens, in), multiplying only the upper triangle of `parts` x `parts`
    column blocks and mirroring it: (parts + 1) / (2 parts) of the multiply-adds of `x.t() @ x`
    (0.63x at 4 parts; measured 0.64-0.72x of the time on 576-2048 wide inputs). Each entry is the
    same dot product over the same tokens, so the result equals `x.t() @ x` here (checked bit for
    bit on this CPU) and, once split, exactly symmetric."""
    n = x.shape[1]
    parts = max(1, min(parts, n // 128))  # blocks under 128 columns would cost more than they save
    cuts = [i * n // parts for i in range(parts + 1)]
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for a, b in zip(cuts, cuts[1:]):
        rows = x[:, a:b].t() @ x[:, a:]  # (b - a, n - a): this block row from the diagonal on
        out[a:b, a:] = rows
        out[b:, a:b] = rows[:, b - a :].t()
    return out


# Inputs up to this width get their factor in fp64 (two fp64 matrices at the peak: 1.07 GB at
# 8192, the widest input of SmolLM2-1.7B and Llama-3.2-3B); wider ones (Llama-3-8B's 14336-wide
# down_proj: 3.3 GB in fp64) in fp32 in the memory of one copy, as llm-compressor and the GPTQ
# reference compute every factor. fp32 against fp64 is rounding, but on SmolLM2 it moved SparseGPT
# 2:4 by 4.7% (docs/pruning.md), so the models we measure keep fp64 and their numbers reproduce.
FP64_MAX_WIDTH = 8192


def inverse_hessian_factor(h: Tensor, damp: float, order: Tensor | None = None,
                           fp64_max_width: int = FP64_MAX_WIDTH) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, retrying with more damping; with
    `order`, of H's rows and columns in that order (gathered straight into each try's copy, so no
    permuted copy of H stays alive beside it).

    Up to `fp64_max_width` inputs in fp64, with at most two (in, in) fp64 matrices alive at a time:
    each step writes over the one before it. Wider, in fp32 and in the memory of the one copy
    (`_factor_in_place`; the result is a column-major view of it), so that Llama-3-8B's 14336-wide
    down_proj needs 0.8 GB beside its Hessian instead of 3.3 GB. (The same factor without the
    explicit inverse, a Cholesky of the reversed H and one triangular solve, is 2.75x fewer
    operations and left GPTQ's codes unchanged, but it moved SparseGPT's masks by rounding, 1% on
    24 windows; not adopted.)"""
    dead = torch.diag(h) == 0
    if order is not None:
        dead = dead[order]
    dtype = torch.float64 if h.shape[0] <= fp64_max_width else torch.float32
    for factor in (1.0, 10.0, 100.0):
        # a fresh copy each try: the damping is added in place
        m = h.to(dtype, copy=True) if order is None else h[order[:, None], order].to(dtype)
        m[dead, dead] = 1.0
        diag = m.diagonal()
        diag.add_(damp * factor * diag.mean())
        del diag
        if dtype == torch.float32:
            u = _factor_in_place(m)
            if u is None:
                continue
            return u
        try:
            chol = torch.linalg.cholesky(m, out=m)  # L, in m's place
        except torch.linalg.LinAlgError:
            continue
        # H^-1 = L^-T L^-1 via a triangular solve (much faster here than cholesky_inverse), solved
        # in the identity's place
        eye = torch.eye(h.shape[0], dtype=chol.dtype, device=chol.device)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False, out=eye)
        del chol, m
        inverse = chol_inv.t() @ chol_inv
        del chol_inv, eye
        try:
            return torch.linalg.cholesky(inverse, upper=True, out=inverse).float()
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with 100x damping")


def _factor_in_place(m: Tensor) -> Tensor | None:
    """Upper Cholesky factor of m^-1 for a symmetric m, written over m: Cholesky, `cholesky_inverse`,
    upper Cholesky. m's transpose is m itself laid out column-major, LAPACK's own order, so with
    it as `out` torch runs each step in place (with a row-major `out` it copies the matrix first).
    None when m, or its inverse in this precision, is not positive definite."""
    f = m.mT
    info = torch.zeros((), dtype=torch.int32, device=m.device)
    torch.linalg.cholesky_ex(f, out=(f, info))
    if info.item() != 0:
        return None
    torch.cholesky_inverse(f, out=f)
    torch.linalg.cholesky_ex(f, upper=True, out=(f, info))
    return f if info.item() == 0 else None
