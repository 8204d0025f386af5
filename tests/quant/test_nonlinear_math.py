"""NF4 / log2 / k-means math on tiny tensors, LUTLinear through the artifact, and config errors."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama  # tests/tiny.py
from torch import nn

from slimformer.api import load
from slimformer.artifact import save_artifact
from slimformer.config import build_config
from slimformer.errors import UserError
from slimformer.quant.lut_linear import LUTLinear
from slimformer.quant.nonlinear import CodebookConfig, Log2Config, NF4Config, codebook
from slimformer.quant.nonlinear_math import (
    absmax_scale, codebook_quantize, kmeans_1d, log2_codes, log2_levels, nf4_levels, scaled_codes,
)
from slimformer.quant.qscheme import fake_quantize, sqnr_db
from slimformer.registry import get_method

# QLoRA / bitsandbytes' published NF4 table
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def _gauss(out: int = 64, inp: int = 576, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_nf4_levels_match_published_table() -> None:
    levels = nf4_levels()
    assert levels.shape == (16,)
    assert torch.allclose(levels, torch.tensor(NF4_PUBLISHED), atol=1e-4, rtol=0)
    assert levels[7] == 0 and levels[0] == -1 and levels[15] == 1  # asymmetric, exact zero


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log2_levels_are_powers_of_two(bits: int) -> None:
    levels = log2_levels(bits)
    k_max = 2 ** (bits - 1) - 2
    assert levels.numel() == 2**bits - 1
    assert bool((levels[1:] > levels[:-1]).all())
    mags = levels[levels > 0]
    assert torch.equal(torch.log2(mags), -torch.arange(k_max, -1, -1, dtype=torch.float32))
    assert torch.equal(levels[levels < 0], -mags.flip(0))


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_log2_codes_pick_the_nearest_level(bits: int) -> None:
    levels = log2_levels(bits)
    k_max = 2 ** (bits - 1) - 2
    # random values plus the spots where exponent rounding to nearest would go wrong: 0.72 * 2^-k
    # lies above the geometric midpoint (0.707) but below the linear one (0.75), so 2^-(k+1) is nearer
    probes = 0.72 * torch.pow(2.0, -torch.arange(k_max + 1, dtype=torch.float32))
    x = torch.cat([torch.rand(20_000) * 2 - 1, probes, -probes, torch.zeros(1)])
    got = (levels[log2_codes(x, bits)] - x).abs()
    best = (levels.unsqueeze(0) - x.unsqueeze(1)).abs().amin(dim=1)  # brute force over all levels
    assert torch.allclose(got, best, atol=1e-7, rtol=0)
    if k_max >= 1:
        assert levels[log2_codes(probes[:1], bits)].item() == 0.5  # 0.72 -> 0.5, not 1


def test_nf4_scales_cover_a_short_last_group() -> None:
    w = _gauss(8, 576)  # 576 = 4 x 128 + 64
    scale = absmax_scale(w, 128)
    assert scale.shape == (8, 5) and scale.dtype == torch.float16
    assert torch.equal(scale[:, 4].float() >= w[:, 512:].abs().amax(dim=1), torch.ones(8, dtype=torch.bool))
    levels = nf4_levels().half().float()
    codes = scaled_codes(w, scale, 128, levels, 4)
    deq = levels[codes.long()] * scale.float().repeat_interleave(128, dim=1)[:, :576]
    assert sqnr_db(w, deq) > 18  # measured 20.4 dB on N(0, 1) rows


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_kmeans_beats_uniform_rtn(bits: int) -> None:
    w = _gauss()
    tables, codes = codebook_quantize(w, bits, iters=20, rows_per_table=w.shape[0])
    sqnr_km = sqnr_db(w, tables[0].float()[codes.long()])
    sqnr_rtn = sqnr_db(w, fake_quantize(w, bits, 0, symmetric=False)[0])  # one grid per tensor, like one codebook
    # measured (dB): bits 2: 9.3 vs 2.2, 3: 14.6 vs 9.2, 4: 19.6 vs 15.8, 5: 23.8 vs 22.0
    assert sqnr_km > sqnr_rtn + 1.0


def test_kmeans_error_falls_with_bits_and_iterations() -> None:
    w = _gauss()
    sqnr = [sqnr_db(w, t[0].float()[c.long()]) for t, c in (codebook_quantize(w, b, 20, 64) for b in range(1, 7))]
    assert all(b > a + 3 for a, b in zip(sqnr, sqnr[1:])), sqnr  # ~4-5 dB per bit measured
    by_iters = [sqnr_db(w, t[0].float()[c.long()]) for t, c in (codebook_quantize(w, 4, i, 64) for i in (1, 5, 20))]
    assert by_iters[0] < by_iters[1] < by_iters[2], by_iters


def test_kmeans_assigns_nearest_centroid_per_table() -> None:
    x = _gauss(3, 500)
    c, codes = kmeans_1d(x, 8, 10)
    assert c.shape == (3, 8) and bool((c[:, 1:] >= c[:, :-1]).all())
    got = (c.float().gather(1, codes) - x).abs()
    best = (c.float().unsqueeze(1) - x.unsqueeze(2)).abs().amin(dim=2)  # (3, 500)
    assert torch.allclose(got, best, atol=1e-7, rtol=0)


def test_codebook_rows_gives_one_table_per_row_group() -> None:
    lin = nn.Sequential(nn.Linear(40, 10))
    lin[0].weight.data = _gauss(10, 40)
    codebook(lin, CodebookConfig(targets=("0",), bits=3, scope="rows", rows_per_codebook=4, group_size=None))
    layer = lin[0]
    assert isinstance(layer, LUTLinear) and layer.table.shape == (3, 8)  # 10 = 4 + 4 + 2 rows
    assert layer.codes.max() < 8 and layer.scale is None


def test_keep_extremes_keeps_outliers_unclipped() -> None:
    w = _gauss(32, 64)
    w[5, 7] = 8.0  # one "super weight", 2x the largest of the rest: k-means alone clips it
    clipped, codes = codebook_quantize(w, 3, 20, 32, keep_extremes=False)
    assert clipped[0].float()[codes[5, 7].long()] < 6
    kept, codes = codebook_quantize(w, 3, 20, 32, keep_extremes=True)
    assert kept[0].float()[codes[5, 7].long()] == 8.0 and kept[0, 0] == w.min().half()
    # with per-channel absmax scales (the default) the row's absmax maps to +-1 times its scale
    lin = nn.Sequential(nn.Linear(64, 32))
    lin[0].weight.data = w.clone()
    codebook(lin, CodebookConfig(targets=("0",), bits=3))
    assert lin[0].scale.shape == (32, 1) and abs(float(lin[0].weight[5, 7]) - 8.0) < 0.01


def _tiny() -> nn.Module:
    return tiny_llama(hidden_size=40, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048)


@pytest.mark.parametrize("method, config", [
    ("nf4", NF4Config(group_size=16)),  # 40 = 2 x 16 + 8
    ("log2", Log2Config(bits=3, group_size=-1)),
    ("codebook", CodebookConfig(bits=5, scope="rows", rows_per_codebook=16, iters=3, group_size=16)),
    ("codebook", CodebookConfig(bits=2, iters=3, group_size=None)),
])
def test_lut_artifact_round_trip_is_exact(tmp_path, method: str, config) -> None:
    model = _tiny()
    get_method(method).apply(model, config, None)
    ids = torch.arange(20).remainder(64).unsqueeze(0)
    save_artifact(model, tmp_path, kind="decoder")
    loaded = load(tmp_path)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    before = dict(model.named_buffers())
    for name, buf in loaded.named_buffers():
        if name.endswith((".codes", ".table", ".scale")):
            assert torch.equal(buf, before[name]), name
    manifest = (tmp_path / "manifest.json").read_text()
    assert '"class": "LUTLinear"' in manifest and '"encoding": "packed"' in manifest


@pytest.mark.parametrize("cls, values, message", [
    (NF4Config, {"group_size": 0}, "nf4: group_size"),
    (Log2Config, {"bits": 1}, "log2: bits"),
    (Log2Config, {"bits": 9}, "log2: bits"),
    (Log2Config, {"group_size": -2}, "log2: group_size"),
    (CodebookConfig, {"bits": 0}, "codebook: bits"),
    (CodebookConfig, {"bits": 9}, "codebook: bits"),
    (CodebookConfig, {"iters": 0}, "codebook: iters"),
    (CodebookConfig, {"scope": "rows"}, "codebook: rows_per_codebook"),
    (CodebookConfig, {"rows_per_codebook": 8}, "codebook: rows_per_codebook applies only"),
    (CodebookConfig, {"group_size": 0}, "codebook: group_size"),
    (CodebookConfig, {"bits": 1}, "codebook: keep_extremes needs bits >= 2"),
])
def test_bad_configs_raise(cls, values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config(cls, values, "step")


def test_bad_scope_and_unknown_key_raise() -> None:
    with pytest.raises(UserError, match="scope"):
        build_config(CodebookConfig, {"scope": "tensor"}, "codebook")
    with pytest.raises(UserError, match="unknown key"):
        build_config(NF4Config, {"bits": 4}, "nf4")
