"""Bit packing: exact round trips and exact byte counts for every width 2..8."""

from __future__ import annotations

import pytest
import torch

from slimformer.quant.packing import pack_bitmask, pack_codes, unpack_bitmask, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_round_trip(bits: int, symmetric: bool) -> None:
    offset = 2 ** (bits - 1) if symmetric else 0
    q = torch.randint(-offset, 2**bits - offset, (7, 143), dtype=torch.int16)  # 1001 codes: odd count
    packed = pack_codes(q, bits, offset)
    assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, offset, q.numel(), tuple(q.shape)), q)


def test_four_bit_is_two_codes_per_byte() -> None:
    packed = pack_codes(torch.tensor([1, 2, 15], dtype=torch.int16), 4, 0)
    assert packed.tolist() == [1 | (2 << 4), 15]


def test_out_of_range_codes_are_refused() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([16], dtype=torch.int16), 4, 0)


def test_bitmask_round_trip() -> None:
    mask = torch.rand(13, 7) > 0.3
    packed = pack_bitmask(mask)
    assert packed.numel() == (91 + 7) // 8
    assert torch.equal(unpack_bitmask(packed, mask.numel(), tuple(mask.shape)), mask)
