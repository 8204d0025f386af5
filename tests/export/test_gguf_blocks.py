"""GGML block packing: our bytes, read back by gguf-py (llama.cpp's own Python reader), give exactly
the weights our codes dequantize to (Q4_0, Q5_0, Q8_0), or differ by no more than the stated fp16
rounding of each block's offset (Q4_1, Q5_1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as ggml_dequantize

from slimformer.export.gguf_blocks import (
    BLOCK_TYPES, QK, block_type, blockable, offsets_fp16, pack_blocks, per_block, rope_row_order,
)
from slimformer.quant.qscheme import QParams, dequantize, n_groups, qrange

GROUPS = [(32, 256), (64, 256), (128, 256), (128, 320), (-1, 256), (0, 256)]  # (group_size, in_features)


def _random_qparams(bits: int, symmetric: bool, group_size: int, in_f: int, out_f: int = 12, seed: int = 0):
    """Random codes over the whole range and fp16 scales over 10 binades (some fp16 subnormals)."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(bits, symmetric)
    codes = torch.randint(qmin, qmax + 1, (out_f, in_f), generator=g, dtype=torch.int16)
    shape = (1, 1) if group_size == 0 else (out_f, n_groups(in_f, group_size))
    scale = torch.exp2(torch.rand(shape, generator=g) * 10 - 14).half()  # 2^-14 .. 2^-4, subnormals below 2^-14
    if scale.numel() > 1:
        scale[-1, -1] = 3e-7  # an fp16 subnormal scale
    zero = (torch.zeros(shape, dtype=torch.int16) if symmetric
            else torch.randint(qmin, qmax + 1, shape, generator=g, dtype=torch.int16))
    return codes, QParams(scale, zero, bits, group_size, symmetric)


def _ggml(codes: torch.Tensor, qp: QParams, kind: str) -> tuple[torch.Tensor, np.ndarray]:
    """(what gguf-py dequantizes our bytes to (out, in) fp32, our bytes)."""
    in_f = codes.shape[1]
    d, z = per_block(qp.scale, in_f, qp.group_size), per_block(qp.zero, in_f, qp.group_size)
    raw = pack_blocks(codes, d, kind, None if qp.symmetric else z)
    assert raw.dtype == np.uint8 and raw.shape == (codes.shape[0], in_f // QK * BLOCK_TYPES[kind][3])
    return torch.from_numpy(ggml_dequantize(raw, GGMLQuantizationType[kind]).copy()), raw


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q8_0"])
@pytest.mark.parametrize(("group_size", "in_f"), GROUPS)
def test_symmetric_codes_read_back_bit_exact(kind: str, group_size: int, in_f: int) -> None:
    bits = BLOCK_TYPES[kind][0]
    codes, qp = _random_qparams(bits, True, group_size, in_f)
    got, _ = _ggml(codes, qp, kind)
    assert torch.equal(got, dequantize(codes, qp))  # fp32, bit for bit


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_1"])
@pytest.mark.parametrize(("group_size", "in_f"), GROUPS)
def test_asymmetric_codes_differ_only_by_offset_rounding(kind: str, group_size: int, in_f: int) -> None:
    bits = BLOCK_TYPES[kind][0]
    codes, qp = _random_qparams(bits, False, group_size, in_f, seed=1)
    got, _ = _ggml(codes, qp, kind)
    ours = dequantize(codes, qp)
    d, z = per_block(qp.scale, in_f, group_size), per_block(qp.zero, in_f, group_size)
    m, err = offsets_fp16(d, z)  # (out|1, in/32)
    per_weight = err.expand(codes.shape[0], -1).repeat_interleave(QK, dim=1)  # (out, in)
    assert torch.equal(got - ours, per_weight)  # the offset's rounding is the only difference, exactly
    spacing = torch.from_numpy(np.spacing(np.abs(m.numpy())).astype(np.float32))  # ulp_fp16(|m|)
    assert bool((err.abs() <= spacing / 2).all())  # |dm| <= ulp_fp16(m) / 2
    assert float(err.abs().max()) > 0  # random zero points: the rounding is real, not vacuous


def test_byte_layout_matches_ggml_by_hand() -> None:
    """Q4_0: fp16 d, then byte j = element j (low nibble) | element j + 16 (high nibble);
    Q5_0: d, qh with bit j = fifth bit of element j, nibbles; Q4_1: d, m, nibbles; Q8_0: d, int8."""
    d = torch.tensor([[0.5]], dtype=torch.float16)
    q4 = (torch.arange(QK) % 16 - 8).to(torch.int16).view(1, QK)  # q = code + 8 = j % 16
    raw = pack_blocks(q4, d, "Q4_0")[0]
    assert raw[:2].tobytes() == np.float16(0.5).astype("<f2").tobytes()
    assert list(raw[2:]) == [(j % 16) | ((j + 16) % 16) << 4 for j in range(16)]
    q5 = (torch.arange(QK) - 16).to(torch.int16).view(1, QK)  # q = j: the fifth bit is set for j >= 16
    raw = pack_blocks(q5, d, "Q5_0")[0]
    assert raw[2:6].tobytes() == (0xFFFF0000).to_bytes(4, "little")
    assert list(raw[6:]) == [j | (j + 16) % 16 << 4 for j in range(16)]
    raw = pack_blocks(torch.arange(QK, dtype=torch.int16).view(1, QK) % 16, d, "Q4_1", torch.tensor([[3]]))[0]
    assert raw[2:4].tobytes() == np.float16(-1.5).astype("<f2").tobytes()  # m = -d * zero
    q8 = (torch.arange(QK) * 8 - 128).to(torch.int16).view(1, QK)
    raw = pack_blocks(q8, d, "Q8_0")[0]
    assert raw[2:].view(np.int8).tolist() == q8[0].tolist()


def test_rope_rows_are_llama_cpps_permute_and_exact_on_codes() -> None:
    heads, head_dim, cols = 3, 8, 64
    w = torch.randn(heads * head_dim, cols)
    # llama.cpp's converter: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    theirs = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    order = rope_row_order(w.shape[0], heads)
    assert torch.equal(w[order], theirs)
    # transformers' GGUF loader undoes it: reshape(n_head, dim, 2, ...).swapaxes(2, 1)
    assert torch.equal(theirs.reshape(heads, head_dim // 2, 2, cols).swapaxes(2, 1).reshape(w.shape), w)
    codes, qp = _random_qparams(4, False, 32, cols, out_f=heads * head_dim)
    moved = QParams(qp.scale[order], qp.zero[order], 4, 32, False)
    assert torch.equal(dequantize(codes[order], moved), dequantize(codes, qp)[order])  # rows keep their own scales


def test_pruned_weights_symmetric_zero_asymmetric_offset_rounding() -> None:
    codes, qp = _random_qparams(4, True, 32, 128, seed=2)
    codes[:, ::3] = 0  # pruned: code 0 -> q = 8 -> d * 0
    got, _ = _ggml(codes, qp, "Q4_0")
    assert bool((got[:, ::3] == 0).all())
    zero = torch.full((2, 4), 7, dtype=torch.int16)
    for scale, exact in ((2.0**-6, True), (0.0123, False)):  # 7 * 2^-6 fits fp16; 7 * fp16(0.0123) does not
        qp = QParams(torch.full((2, 4), scale, dtype=torch.float16), zero, 4, 32, False)
        pruned = torch.full((2, 128), 7, dtype=torch.int16)  # every weight at its zero point
        got, _ = _ggml(pruned, qp, "Q4_1")
        m, err = offsets_fp16(per_block(qp.scale, 128, 32), per_block(zero, 128, 32))
        assert bool((got == err[0, 0]).all()) and (float(err[0, 0]) == 0) == exact
        assert abs(float(err[0, 0])) <= np.spacing(np.float16(abs(float(m[0, 0])))) / 2


@pytest.mark.parametrize(("bits", "symmetric", "kind"), [
    (4, True, "Q4_0"), (4, False, "Q4_1"), (5, True, "Q5_0"), (5, False, "Q5_1"), (8, True, "Q8_0"),
    (3, True, None), (6, True, None), (7, False, None), (8, False, None), (2, True, None),
])
def test_block_type_only_for_codes_held_unchanged(bits: int, symmetric: bool, kind: str | None) -> None:
    assert block_type(bits, symmetric) == kind


@pytest.mark.parametrize(("in_f", "group_size", "ok"), [
    (576, 32, True), (576, 128, True), (576, -1, True), (576, 0, True),  # 576 = 4 x 128 + 64: whole blocks
    (576, 48, False), (576, 16, False), (200, -1, False), (200, 64, False),
])
def test_blockable_groups_are_whole_blocks(in_f: int, group_size: int, ok: bool) -> None:
    assert blockable(in_f, group_size) is ok
