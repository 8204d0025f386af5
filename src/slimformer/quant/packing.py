"""Bit packing for the artifact: `bits`-bit codes and 1-bit masks stored densely in uint8 streams."""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)  # little-endian bit order within a byte


def _bits_to_bytes(bits: Tensor) -> Tensor:
    """(n,) bool/0-1 -> (ceil(n/8),) uint8, 8 flags per byte."""
    n = bits.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.int32)
    padded[:n] = bits.reshape(-1).to(torch.int32)
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def _bytes_to_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of `_bits_to_bytes`: (m,) uint8 -> (n,) int32 of 0/1."""
    bits = (packed.to(torch.int32).unsqueeze(1) & _BIT_WEIGHTS).ne(0).to(torch.int32)
    return bits.reshape(-1)[:n]


def pack_codes(q: Tensor, bits: int, offset: int) -> Tensor:
    """Store (q + offset), each in [0, 2^bits), as a flat uint8 stream of ceil(numel*bits/8) bytes."""
    u = (q.reshape(-1).to(torch.int32) + offset)
    if int(u.min()) < 0 or int(u.max()) >= 2**bits:
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte
        per = 8 // bits
        n = u.numel()
        padded = torch.zeros(((n + per - 1) // per) * per, dtype=torch.int32)
        padded[:n] = u
        shifts = bits * torch.arange(per, dtype=torch.int32)
        return (padded.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)
    # 3, 5, 6, 7 bits: spread each code over its bits, then pack the bit stream
    flags = (u.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1  # (n, bits)
    return _bits_to_bytes(flags)


def unpack_codes(packed: Tensor, bits: int, offset: int, numel: int, shape: tuple[int, ...]) -> Tensor:
    """Exact inverse of `pack_codes`: int16 codes of `shape`."""
    packed = packed.reshape(-1)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = bits * torch.arange(per, dtype=torch.int32)
        u = ((packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    else:
        flags = _bytes_to_bits(packed, numel * bits).view(numel, bits)
        u = (flags << torch.arange(bits, dtype=torch.int32)).sum(dim=1)
    return (u - offset).to(torch.int16).reshape(shape)


def pack_bitmask(mask: Tensor) -> Tensor:
    """(any shape) bool -> uint8, 8 flags per byte, row-major."""
    return _bits_to_bytes(mask.reshape(-1))


def unpack_bitmask(packed: Tensor, numel: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `pack_bitmask`."""
    return _bytes_to_bits(packed.reshape(-1), numel).bool().reshape(shape)
