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


@pytest.mark.parametrize("bits", range(2, 9))
def test_flat_odd_numel_and_known_layout(bits: int) -> None:
    torch.manual_seed(bits)
    q = torch.randint(0, 2**bits, (1001,), dtype=torch.int16)
    packed = pack_codes(q, bits, 0)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 0, 1001, (1001,)), q)
    # reference layout: little-endian bit stream, value i's bit j at stream bit i*bits + j
    stream = ((q.long().unsqueeze(1) >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(packed.numel() * 8 - stream.numel())])
    ref = (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)
    assert torch.equal(packed, ref)


def test_two_bit_is_four_codes_per_byte_and_empty() -> None:
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3]), 2, 0).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    assert pack_codes(torch.zeros(0, dtype=torch.int16), 3, 0).numel() == 0


def test_multi_block_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    import slimformer.quant.packing as packing

    monkeypatch.setattr(packing, "_BLOCK", 64)  # force many blocks with a ragged tail
    q = torch.randint(-16, 16, (1001,), dtype=torch.int16)
    packed = pack_codes(q, 5, 16)
    assert packed.numel() == (1001 * 5 + 7) // 8
    assert torch.equal(unpack_codes(packed, 5, 16, 1001, (1001,)), q)
    mask = torch.rand(1001) > 0.5
    assert torch.equal(unpack_bitmask(pack_bitmask(mask), 1001, (1001,)), mask)


def test_truncated_stream_is_a_user_error() -> None:
    from slimformer.errors import UserError

    packed = pack_codes(torch.randint(0, 8, (100,)), 3, 0)
    with pytest.raises(UserError, match="truncated"):
        unpack_codes(packed[:-1], 3, 0, 100, (100,))


def test_bitmask_known_bits() -> None:
    mask = torch.tensor([True, False, False, True, False, False, False, False, True])
    packed = pack_bitmask(mask)
    assert packed.tolist() == [0b1001, 1]
    assert torch.equal(unpack_bitmask(packed, 9, (9,)), mask)
