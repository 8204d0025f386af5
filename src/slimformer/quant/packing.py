"""Bit packing for the artifact: `bits`-bit codes and 1-bit masks stored densely in uint8 streams.

Layout (little-endian bit stream): bit j of value i is stream bit i * bits + j, and stream bit k
lies in byte k // 8 at bit k % 8. So 4-bit values pack as byte = v0 | v1 << 4, 2-bit values four
to a byte, and 3/5/6/7-bit values straddle bytes. n values take exactly ceil(n * bits / 8) bytes.

Vectorised: every 8 values (8 * bits bits = `bits` whole bytes) are merged into one int64 word,
which is then split into bytes. Work runs in blocks of _BLOCK values to bound temporary memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimformer.errors import UserError

_BLOCK = 1 << 22  # values per block (a multiple of 8): ~100 MB of int64 temporaries at most


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8 for packing, got {bits!r}")


def _shifts(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bit offsets of the 8 values in a word, (8,), and of the `bits` bytes in a word, (bits,)."""
    value_shifts = bits * torch.arange(8, dtype=torch.int64, device=device)
    byte_shifts = 8 * torch.arange(bits, dtype=torch.int64, device=device)
    return value_shifts, byte_shifts


def _pack(u: Tensor, bits: int) -> Tensor:
    """(n,) non-negative integers < 2^bits (any int/bool dtype) -> (ceil(n*bits/8),) uint8."""
    n = u.numel()
    n_bytes = (n * bits + 7) // 8
    if bits == 8:
        return u.to(torch.uint8)
    out = torch.empty(n_bytes, dtype=torch.uint8, device=u.device)
    value_shifts, byte_shifts = _shifts(bits, u.device)
    for start in range(0, n, _BLOCK):
        blk = u[start : start + _BLOCK].to(torch.int64)
        m = (blk.numel() + 7) // 8  # words in this block
        if m * 8 != blk.numel():  # only the last block: zero-pad to whole words
            blk = torch.cat([blk, blk.new_zeros(m * 8 - blk.numel())])
        words = (blk.view(m, 8) << value_shifts).sum(dim=1)  # (m,) int64, at most 56 bits used
        stream = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (m*bits,)
        b0 = start * bits // 8  # exact: start is a multiple of 8
        take = min(stream.numel(), n_bytes - b0)  # drop bytes holding only padding
        out[b0 : b0 + take] = stream[:take]
    return out


def _unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `_pack`: (>= ceil(n*bits/8),) uint8 -> (n,) int64."""
    packed = packed.reshape(-1)
    n_bytes = (n * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.numel() < n_bytes:
        raise UserError(
            f"packed stream holds {packed.numel()} {packed.dtype} values but {n} x {bits}-bit values need "
            f"{n_bytes} uint8 bytes; the artifact is truncated or corrupt, re-export it."
        )
    if bits == 8:
        return packed[:n].to(torch.int64)
    out = torch.empty(n, dtype=torch.int64, device=packed.device)
    value_shifts, byte_shifts = _shifts(bits, packed.device)
    mask = (1 << bits) - 1
    for start in range(0, n, _BLOCK):
        count = min(_BLOCK, n - start)
        m = (count + 7) // 8
        b0 = start * bits // 8
        blk = packed[b0 : b0 + m * bits].to(torch.int64)
        if blk.numel() < m * bits:  # last block: restore the dropped padding bytes
            blk = torch.cat([blk, blk.new_zeros(m * bits - blk.numel())])
        words = (blk.view(m, bits) << byte_shifts).sum(dim=1)  # (m,) int64
        vals = ((words.unsqueeze(1) >> value_shifts) & mask).reshape(-1)  # (m*8,)
        out[start : start + count] = vals[:count]
    return out


def pack_codes(q: Tensor, bits: int, offset: int) -> Tensor:
    """Store (q + offset), each in [0, 2^bits), row-major as a flat uint8 stream of ceil(numel*bits/8) bytes.

    offset is 2^(bits-1) for symmetric codes and 0 for asymmetric ones. ValueError if a code does not fit.
    """
    _check_bits(bits)
    flat = q.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=q.device)
    lo, hi = int(flat.min()) + offset, int(flat.max()) + offset
    if lo < 0 or hi >= 2**bits:
        raise ValueError(f"codes + offset span [{lo}, {hi}], outside [0, {2**bits - 1}] for {bits}-bit packing")
    u = flat if offset == 0 else flat.to(torch.int32) + offset
    return _pack(u, bits)


def unpack_codes(packed: Tensor, bits: int, offset: int, numel: int, shape: tuple[int, ...]) -> Tensor:
    """Exact inverse of `pack_codes`: int16 codes of `shape` (numel values)."""
    _check_bits(bits)
    return (_unpack(packed, bits, numel) - offset).to(torch.int16).reshape(shape)


def pack_bitmask(mask: Tensor) -> Tensor:
    """(any shape) bool -> (ceil(numel/8),) uint8, 8 flags per byte, row-major, bit 0 first."""
    return _pack(mask.reshape(-1).bool(), 1)


def unpack_bitmask(packed: Tensor, numel: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `pack_bitmask`: bool of `shape`."""
    return _unpack(packed, 1, numel).bool().reshape(shape)
