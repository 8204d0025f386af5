"""GGML block packing of slimformer's integer codes: the bytes llama.cpp reads, built from OUR codes
and scales (nothing is re-quantized), as pure vectorised functions.

Every GGML type here holds blocks of 32 consecutive weights of one row, each with its own fp16 scale:

| type | bytes per block | layout | weight |
|---|---|---|---|
| Q4_0 | 18 | d, 16 nibble bytes | d * (q - 8) |
| Q4_1 | 20 | d, m, 16 nibble bytes | d * q + m |
| Q5_0 | 22 | d, qh (4 bytes), 16 nibble bytes | d * (q - 16) |
| Q5_1 | 24 | d, m, qh, 16 nibble bytes | d * q + m |
| Q8_0 | 34 | d, 32 int8 | d * q |

Nibble byte j holds element j in its low and element j + 16 in its high nibble; bit j of qh (a
little-endian uint32) is the fifth bit of element j. d and m are little-endian fp16.

A slimformer group is one scale per `group_size` inputs, so it maps onto whole blocks when
`group_size` is a multiple of 32 (a smaller last group too, when it is itself a multiple of 32), or
per channel / per tensor when the row width is: the group's scale is repeated for each block.

Exactness. Symmetric codes c (w = s * c) become Q4_0/Q5_0/Q8_0 with d = s, q = c + offset: ggml's
d * (q - offset) is the same fp32 product, bit for bit; a pruned weight (c = 0) stays exactly 0.
Asymmetric codes c with zero point z (w = s * (c - z)) become Q4_1/Q5_1 with d = s, q = c and
m = fp16(-s * z): s * z (an fp16 times an integer below 32) is exact in fp32, but it has up to 16
significant bits, so storing it in fp16 rounds it to nearest, |m - (-s z)| <= ulp_fp16(m) / 2.
ggml's d * q + m is then exactly s * (c - z) + (m - (-s z)) in fp32 (every term is a multiple of
ulp(s) and the sum fits 24 bits), so each weight is off by that block's offset rounding and no more.
A pruned weight (c = z) therefore reads m + s z, zero only where s * z fits fp16.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QK = 32  # weights per ggml block

# ggml type name -> (bits, symmetric, code offset making q >= 0, bytes per block)
BLOCK_TYPES = {
    "Q4_0": (4, True, 8, 18),
    "Q4_1": (4, False, 0, 20),
    "Q5_0": (5, True, 16, 22),
    "Q5_1": (5, False, 0, 24),
    "Q8_0": (8, True, 0, 34),
}


def block_type(bits: int, symmetric: bool) -> str | None:
    """The GGML type holding `bits`-bit codes unchanged, or None (e.g. 3, 6 or 7 bits, asymmetric 8)."""
    return next((name for name, (b, sym, _, _) in BLOCK_TYPES.items() if (b, sym) == (bits, symmetric)), None)


def blockable(in_features: int, group_size: int) -> bool:
    """True when every 32-weight block of a row lies inside one slimformer group."""
    return in_features % QK == 0 and (group_size <= 0 or group_size % QK == 0)


def per_block(t: Tensor, in_features: int, group_size: int) -> Tensor:
    """(out|1, n_groups) per-group values -> (out|1, in / 32) per-block values."""
    n_blocks = in_features // QK
    if group_size <= 0:  # per channel (out, 1) or per tensor (1, 1): one value for all blocks
        return t[:, :1].expand(-1, n_blocks)
    return t.repeat_interleave(group_size // QK, dim=1)[:, :n_blocks]


def rope_row_order(rows: int, n_head: int) -> Tensor:
    """Row indices that llama.cpp's converter applies to q_proj/k_proj of Llama models: within each
    head, HF's rotary layout (dimension i paired with i + head_dim/2) becomes ggml's adjacent pairs
    (2i, 2i + 1): row (h, i, j) of the result, over (heads, head_dim/2, 2), is row (h, j, i) of the
    input over (heads, 2, head_dim/2).

    Returned as a gather index so that codes, scales, zeros and biases (all indexed by output row)
    move together, which is exact: every row keeps its own values."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of pairs")
    return torch.arange(rows).view(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def _fp16_bytes(x: Tensor) -> np.ndarray:
    """(R, nb) fp16 -> (R, nb, 2) little-endian bytes."""
    return x.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(R, nb, 32) values in 0..15 -> (R, nb, 16) bytes: element j low nibble, j + 16 high nibble."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(R, nb, 32) values in 0..31 -> (R, nb, 4) bytes of a little-endian uint32, bit j = bit 4 of element j."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def offsets_fp16(d: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_1/Q5_1 offsets: (m = fp16(-d * zero), m - (-d * zero) in fp32), per block.

    d * zero is exact in fp32 (an fp16 times an integer < 2^8); the only loss is rounding m to fp16."""
    exact = -(d.float() * zero.float())  # (R, nb)
    m = exact.to(torch.float16)
    return m, m.float() - exact


def pack_blocks(codes: Tensor, d: Tensor, kind: str, zero: Tensor | None = None, *,
                minimum: Tensor | None = None) -> np.ndarray:
    """Codes (out, in) int16 + per-block scale d (out|1, in/32) fp16 [+ per-block zero, or the fp16
    offsets `minimum` themselves (w = d * code + m, stored exactly), for Q4_1/Q5_1]
    -> (out, in/32 * bytes_per_block) uint8, ggml's byte layout of `kind`."""
    bits, symmetric, offset, _ = BLOCK_TYPES[kind]
    rows, cols = codes.shape
    if cols % QK:
        raise ValueError(f"{cols} columns are not a whole number of {QK}-weight blocks")
    nb = cols // QK
    d = d.expand(rows, nb)
    q = codes.numpy().astype(np.int16, copy=False).reshape(rows, nb, QK) + np.int16(offset)  # (R, nb, 32)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if kind == "Q8_0" else (0, 2**bits - 1)
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"codes out of the {kind} range {lo}..{hi} after the offset {offset}")
    if kind == "Q8_0":
        parts = [_fp16_bytes(d), q.astype(np.int8).view(np.uint8)]
    else:
        q = q.astype(np.uint8)
        parts = [_fp16_bytes(d)]
        if not symmetric:
            assert zero is not None or minimum is not None, "asymmetric blocks need their zero points or offsets"
            m = minimum.to(torch.float16) if minimum is not None else offsets_fp16(d, zero.expand(rows, nb))[0]
            parts.append(_fp16_bytes(m.expand(rows, nb)))
        if bits == 5:
            parts.append(_high_bits(q))
        parts.append(_nibbles(q))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
