"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the not-yet-quantized columns through the inverse Hessian of the layer's
inputs, H = 2/n sum x x^T. Pure tensor functions; the model walking lives in `gptq.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.calibrate.hessian_math import inverse_hessian_factor
from slimformer.quant.qscheme import QParams, check_scheme, compute_qparams, decode, encode, n_groups, rule_of

# range factors `scale_search` tries per group and row: llama.cpp's Q4_0 search spans d = max / 8.9 .. max / 7.1
# (0.9..1.13 of its max / -8); we also try shrinking to 0.8, where heavy-tailed rows gain (tests/quant)
SEARCH_CLIPS = tuple(round(1.15 - 0.01 * k, 2) for k in range(36))  # 1.0 exactly among them


def searched_group(wg: Tensor, importance: Tensor, bits: int, symmetric: bool, rules: dict[str, str]
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """Encoder and decoder pairs ((out,) each) for one group of weights `wg` (out, g) with column
    importances (g,) or per row (out, g): per row, the
    parameters with the lowest importance-weighted squared error sum_j importance_j (w_j - w^_j)^2
    among, for each range factor in SEARCH_CLIPS, the min/max parameters of that range and their
    weighted least-squares refit (`_refit`: the scale, and for the float rule the minimum, that fit
    the range's codes best, with codes then re-rounded under them). This is what llama.cpp's
    quantizer does with an importance matrix (its weights are the inputs' mean squares: GPTQ passes
    its Hessian diagonal, the same thing); its search tries the refit only."""
    rule = rule_of(rules["scale_rule"], rules["zero_point"])
    best_err, best = None, []
    for clip in SEARCH_CLIPS:
        qp = compute_qparams(wg, bits, -1, symmetric, clip=clip, **rules)
        enc, dec = qp.encoder(), qp.decoder()
        q = encode(wg, enc, bits, symmetric, rule)
        for enc, dec in ((enc, dec), _refit(wg, q, importance, dec, rule)):
            err = ((wg - decode(encode(wg, enc, bits, symmetric, rule), dec, rule)) ** 2 * importance).sum(1)  # (out,)
            pairs = [t[:, 0] for t in (*enc, *dec)]
            if best_err is None:
                best_err, best = err, pairs
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = [torch.where(better, new, old) for new, old in zip(pairs, best)]
    return best[:2], best[2:]


def _refit(wg: Tensor, q: Tensor, importance: Tensor, dec: tuple[Tensor, Tensor], rule: str
           ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(encoder, decoder) pairs (out, 1) whose decoder fits codes q (out, g) to wg best in the
    importance-weighted least-squares sense, rounded to fp16 as stored: the scale alone (w^ = (q - z) d
    with the zero point z kept, or w^ = d q for signed_max), or scale and minimum (float rule: w^ =
    d q + m, a weighted linear regression). Rows whose fit is degenerate keep `dec`."""
    imp = importance if importance.dim() == 2 else importance.reshape(1, -1)  # (rows | 1, g)
    if rule == "float":
        def wsum(t: Tensor) -> Tensor:
            return (imp * t).sum(1, keepdim=True)

        s0, s1, s2, t0, t1 = wsum(torch.ones_like(q)), wsum(q), wsum(q * q), wsum(wg), wsum(q * wg)
        det = s0 * s2 - s1 * s1
        ok = det.abs() > 1e-12 * s0 * s2
        d = torch.where(ok, (s0 * t1 - s1 * t0) / torch.where(ok, det, torch.ones_like(det)), dec[0])
        m = torch.where(ok, (s2 * t0 - s1 * t1) / torch.where(ok, det, torch.ones_like(det)), dec[1])
        d, m = d.half().float(), m.half().float()
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        return (inv, m), (d, m)
    u = q - dec[1]  # codes minus the zero point (0 for symmetric and signed_max)
    num, den = (imp * wg * u).sum(1, keepdim=True), (imp * u * u).sum(1, keepdim=True)
    d = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), dec[0]).half().float()
    if rule == "affine":
        d = torch.where(d > 0, d, dec[0])  # an affine scale stays positive
        return (d, dec[1]), (d, dec[1])
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (inv, torch.zeros_like(d)), (d, dec[1])


def gptq_factor(h: Tensor, damp: float, act_order: bool) -> tuple[Tensor, Tensor]:
    """(column order, upper Cholesky factor of the damped H^-1 in that order): what `gptq_quantize`
    walks. It depends on H alone, so layers sharing one Hessian can share it (`factor=`)."""
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0], device=h.device)
    return order, inverse_hessian_factor(h, damp, order)


def gptq_quantize(
    w: Tensor, h: Tensor, bits: int, group_size: int, symmetric: bool, *, damp: float = 0.01,
    block_size: int = 128, act_order: bool = False, scale_rule: str = "absmax", zero_point: str = "int",
    scale_search: bool = False, factor: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, QParams]:
    """Quantize w (out, in) against Hessian h (in, in); return (int16 codes (out, in), qparams). With
    `factor` (`gptq_factor(h, ...)`), h may be only H's diagonal (in,): all the walk reads of it.

    Groups are contiguous along the input dimension (a smaller last group when group_size does
    not divide it). Without act_order, each group's scale is set from the error-updated weights
    when GPTQ reaches it; with act_order, columns go in decreasing Hessian-diagonal order and
    group scales come from the original weights, so groups stay contiguous on disk. scale_rule /
    zero_point: any `qscheme` parametrization (llama.cpp's signed_max and float minimum included);
    each column is encoded and decoded with `qscheme.encode` / `decode`. scale_search (groups): each
    group's range shrink chosen by `searched_group`, on the updated weights (or, with act_order, on
    the original ones, as its scales are).
    """
    rules = {"scale_rule": scale_rule, "zero_point": zero_point}
    check_scheme(bits, group_size, symmetric=symmetric, **rules)
    rule = rule_of(scale_rule, zero_point)
    out_f, in_f = w.shape
    w = w.detach().float().clone()
    diag = (h if h.dim() == 1 else torch.diag(h)).float()  # the importance of each input column, for scale_search
    w[:, diag == 0] = 0.0
    ng = n_groups(in_f, group_size)
    static = group_size <= 0 or act_order
    if static and scale_search:  # act-order groups: each searched once, on the original weights
        enc_t, dec_t = _searched_static_groups(w, diag, bits, group_size, symmetric, rules)
    else:
        qp = compute_qparams(w.float(), bits, group_size, symmetric, **rules)  # static params (used unless refreshed)
        # per group, transposed to (n_groups, out): encoder pair (codes), decoder pair (weights)
        enc_t = [t.expand(out_f, ng).t().contiguous() for t in qp.encoder()]
        dec_t = [t.expand(out_f, ng).t().contiguous() for t in qp.decoder()]

    if group_size > 0:  # whole groups per block, so a group's columns are all updated when it starts
        block_size = group_size * max(1, block_size // group_size)
    perm, hinv = factor if factor is not None else gptq_factor(h, damp, act_order)
    group_of = (perm // group_size) if group_size > 0 else torch.zeros(in_f, dtype=torch.long, device=w.device)
    # Work on W^T (in, out) so that each column of W is a contiguous row.
    wt = w.t()[perm]  # the gather makes it contiguous: one (in, out) copy, not two
    del w  # (out, in) fp32: 235 MB on Llama-3-8B's down_proj
    codes_t = torch.zeros(in_f, out_f, dtype=torch.int16, device=wt.device)  # codes are integers: stored exactly
    groups = group_of.tolist()  # python ints: the walk below runs once per column, in Python
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = wt[i1:i2].clone()  # (b, out)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        pivots = hinv1.diagonal().tolist()
        g_now = -1
        for j in range(i2 - i1):  # columns are sequential by construction; each step is an (out,) vector op
            col = i1 + j
            g = groups[col]
            if not static and col % group_size == 0:  # a group starts: scale it from the updated weights
                wg = w1[j : j + group_size].t()
                enc, dec = _group_params(wg, diag[col : col + wg.shape[1]], bits, symmetric, rules, scale_search)
                for dst, src in zip(enc_t + dec_t, enc + dec):
                    dst[g] = src
                g_now = -1
            if g != g_now:  # this group's encoder and decoder rows, (out,) each
                enc_g, dec_g, g_now = (enc_t[0][g], enc_t[1][g]), (dec_t[0][g], dec_t[1][g]), g
            q = encode(w1[j], enc_g, bits, symmetric, rule)
            codes_t[col] = q
            err = (w1[j] - decode(q, dec_g, rule)).div_(pivots[j])
            w1[j + 1 :] -= hinv1[j, j + 1 :].unsqueeze(1) * err.unsqueeze(0)  # the later columns absorb its error
            err1[j] = err
        wt[i2:] -= hinv[i1:i2, i2:].t() @ err1
    codes = codes_t.t()[:, torch.argsort(perm)]
    return codes, _final_qparams(dec_t, bits, group_size, symmetric, scale_rule, zero_point)


def _searched_static_groups(w: Tensor, importance: Tensor, bits: int, group_size: int, symmetric: bool,
                            rules: dict[str, str], chunk_elements: int = 1 << 22) -> tuple[list[Tensor], list[Tensor]]:
    """`searched_group` for every group of w (out, in) at once, as (n_groups, out) encoder and decoder
    pairs: the groups' rows stacked into one (groups x out, g) search, a few groups at a time so the
    search's temporaries stay within about `chunk_elements` floats each; a shorter last group alone."""
    out_f, in_f = w.shape
    full = in_f // group_size
    per_chunk = max(1, chunk_elements // (out_f * group_size))
    enc: list[list[Tensor]] = [[], []]
    dec: list[list[Tensor]] = [[], []]
    for g0 in range(0, full, per_chunk):
        n = min(per_chunk, full - g0)
        cols = slice(g0 * group_size, (g0 + n) * group_size)
        wg = w[:, cols].reshape(out_f, n, group_size).transpose(0, 1).reshape(n * out_f, group_size)
        imp = importance[cols].reshape(n, 1, group_size).expand(n, out_f, group_size).reshape(n * out_f, group_size)
        e, d = searched_group(wg, imp, bits, symmetric, rules)
        for k in range(2):
            enc[k].append(e[k].reshape(n, out_f))
            dec[k].append(d[k].reshape(n, out_f))
    if full * group_size < in_f:  # the shorter last group
        e, d = searched_group(w[:, full * group_size :], importance[full * group_size :], bits, symmetric, rules)
        for k in range(2):
            enc[k].append(e[k].unsqueeze(0))
            dec[k].append(d[k].unsqueeze(0))
    return [torch.cat(t) for t in enc], [torch.cat(t) for t in dec]


def _group_params(wg: Tensor, importance: Tensor, bits: int, symmetric: bool, rules: dict[str, str],
                  search: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Encoder and decoder pairs, each (out,), of one group's columns wg (out, g), as GPTQ reaches it."""
    if search:
        return searched_group(wg, importance, bits, symmetric, rules)
    fresh = compute_qparams(wg, bits, -1, symmetric, **rules)
    return [t[:, 0] for t in fresh.encoder()], [t[:, 0] for t in fresh.decoder()]


def _final_qparams(dec_t: list[Tensor], bits: int, group_size: int, symmetric: bool, scale_rule: str,
                   zero_point: str) -> QParams:
    """The stored QParams from the per-group decoder pair (n_groups, out): fp16 scale, and an int16
    zero point or (float rule) an fp16 minimum."""
    scale, offset = dec_t[0].t(), dec_t[1].t()  # (out, n_groups): scale, and zero or minimum
    if group_size == 0:
        scale, offset = scale[:1], offset[:1]
    if rule_of(scale_rule, zero_point) == "float":
        return QParams(scale.half(), torch.zeros_like(scale, dtype=torch.int16), bits, group_size, symmetric,
                       minimum=offset.half(), zero_point=zero_point)
    return QParams(scale.half(), offset.to(torch.int16), bits, group_size, symmetric, scale_rule=scale_rule)
