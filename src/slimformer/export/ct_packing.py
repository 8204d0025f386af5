"""Pure tensor math of the compressed-tensors layout (the format llm-compressor writes and vLLM reads).

Integer conventions there: codes and zero points are signed, q in [-2^(b-1), 2^(b-1)-1], and
w = scale * (q - zp) for symmetric (zp = 0) and asymmetric weights alike. Ours keep asymmetric codes
and zeros unsigned in [0, 2^b-1]; subtracting 2^(b-1) from both maps them into that range and leaves
q - zp, hence every dequantized weight, unchanged.

`pack-quantized` (compressed-tensors 0.19, `pack_to_int32`): each value is offset by +2^(b-1) to
unsigned, and every 32 consecutive values along the packed dimension fill exactly b int32 words,
value i at bits [i*b, i*b + b) of the group's b-word little-endian bit string (a value may straddle
two words); a row is zero-padded to a multiple of 32 values, then cut to ceil(n*b/32) words. Weights
pack along the input dimension (out, in) -> (out, ceil(in*b/32)); asymmetric zero points along the
output dimension (out, groups) -> (ceil(out*b/32), groups).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def to_signed(codes: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Our codes or zero points (int16) -> compressed-tensors' signed range, as int8."""
    shifted = codes if symmetric else codes - (1 << (bits - 1))
    lo, hi = torch.aminmax(shifted)
    if int(lo) < -(1 << (bits - 1)) or int(hi) > (1 << (bits - 1)) - 1:
        raise ValueError(f"codes in [{int(lo)}, {int(hi)}] after the offset, outside the signed {bits}-bit range")
    return shifted.to(torch.int8)


def pack_int32(values: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Signed `bits`-bit values (2-D int8) -> int32 words packed densely along `dim` (0 or 1)."""
    if values.dim() != 2 or values.dtype != torch.int8 or dim not in (0, 1) or not 1 <= bits <= 8:
        raise ValueError("pack_int32 takes a 2-D int8 tensor, dim 0 or 1, and 1-8 bits")
    v = values.t() if dim == 0 else values
    rows, n = v.shape
    chunks = math.ceil(n / 32)  # 32 values fill `bits` words exactly
    u = torch.zeros(rows, chunks * 32, dtype=torch.uint8)
    u[:, :n] = (v.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)  # unsigned, in [0, 2^bits)
    u = u.view(rows * chunks, 32).t().contiguous()  # (32, rows * chunks): value i of every chunk
    out = torch.zeros(bits, rows * chunks, dtype=torch.int64)  # word j of every chunk, its 32 bits
    for i in range(32):  # value i sits at bits [i*bits, (i+1)*bits) of the chunk's bit string
        word, offset = divmod(i * bits, 32)
        ui = u[i].to(torch.int64)
        out[word] |= (ui << offset) & 0xFFFFFFFF
        if offset + bits > 32:  # it straddles two words: its high bits open the next one
            out[word + 1] |= ui >> (32 - offset)
    out = out.t().reshape(rows, chunks * bits)[:, : math.ceil(n * bits / 32)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # the same 32 bits, signed
    return out.t().contiguous() if dim == 0 else out.contiguous()


def unpack_int32(packed: Tensor, bits: int, n: int, dim: int = 1) -> Tensor:
    """Inverse of `pack_int32`: int32 words -> signed int8 values, `n` of them along `dim`."""
    p = packed.t() if dim == 0 else packed
    rows, words = p.shape
    chunks = math.ceil(n / 32)
    u = torch.zeros(rows, chunks * bits + 1, dtype=torch.int64)  # one spare word for the spill read
    u[:, :words] = p.to(torch.int64) & 0xFFFFFFFF
    u = u[:, : chunks * bits]
    start = torch.arange(32, dtype=torch.int64) * bits
    w = u.view(rows, chunks, bits)
    low = torch.gather(w, 2, (start // 32).expand(rows, chunks, 32)) >> (start % 32)
    nxt = torch.gather(torch.cat([w, torch.zeros(rows, chunks, 1, dtype=torch.int64)], 2), 2,
                       (start // 32 + 1).expand(rows, chunks, 32))
    both = low | (nxt << (32 - start % 32))
    vals = (both & ((1 << bits) - 1)).view(rows, -1)[:, :n] - (1 << (bits - 1))
    vals = vals.to(torch.int8)
    return vals.t().contiguous() if dim == 0 else vals
