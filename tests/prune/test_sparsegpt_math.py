"""SparseGPT on a random layer: exact counts, better reconstruction than magnitude, joint quantization."""

from __future__ import annotations

import pytest
import torch

from slimformer.calibrate.hessian_math import accumulate_hessian
from slimformer.prune.magnitude_math import layer_masks
from slimformer.prune.nm_math import nm_masks
from slimformer.prune.sparsegpt_math import sparsegpt_prune
from slimformer.quant.qscheme import dequantize, expand_groups


def _layer_and_inputs(out_f: int = 48, in_f: int = 256, tokens: int = 2048):
    torch.manual_seed(0)
    mix = torch.randn(in_f, in_f) / in_f**0.5
    x = torch.randn(tokens, in_f) @ mix + 0.3 * torch.randn(tokens, in_f)  # correlated inputs, as in real layers
    x[:, :8] *= 10.0  # a few outlier channels
    w = torch.randn(out_f, in_f) / in_f**0.5
    h, _ = accumulate_hessian(None, x, 0)
    return w, x, h


def _rel_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ (w - w_hat).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


@pytest.mark.parametrize("how", ["50%", "2:4"])
def test_sparsegpt_beats_magnitude_on_outputs(how: str) -> None:
    w, x, h = _layer_and_inputs()
    if how == "50%":
        res = sparsegpt_prune(w, h, sparsity=0.5)
        magnitude = w * layer_masks(w.abs(), 0.5)
        assert int((~res.keep).sum()) == w.numel() // 2
    else:
        res = sparsegpt_prune(w, h, nm=(2, 4))
        magnitude = w * nm_masks(w.abs(), 2, 4)
        assert bool((res.keep.view(48, -1, 4).sum(-1) == 2).all())
    assert bool((res.weight[~res.keep] == 0).all())
    ours, theirs = _rel_err(x, w, res.weight), _rel_err(x, w, magnitude)
    assert ours < 0.6 * theirs, (ours, theirs)


def test_exact_count_with_blocks_not_dividing() -> None:
    w, _, h = _layer_and_inputs(in_f=200)
    res = sparsegpt_prune(w, h, sparsity=0.37, block_size=64)
    assert int((~res.keep).sum()) == round(0.37 * w.numel())


def test_joint_quantization_codes_at_zero_point() -> None:
    w, x, h = _layer_and_inputs()
    res = sparsegpt_prune(w, h, sparsity=0.5, bits=4, group_size=64, symmetric=False)
    qp = res.qparams
    zero = expand_groups(qp.zero, w.shape[1], 64)
    assert torch.equal(res.codes[~res.keep], zero[~res.keep])  # pruned -> the group's zero point
    assert int((res.codes.int() < 0).sum() + (res.codes.int() > 15).sum()) == 0
    deq = dequantize(res.codes, qp)
    assert torch.equal(deq, res.weight) and bool((deq[~res.keep] == 0).all())
    pruned_only = sparsegpt_prune(w, h, sparsity=0.5)
    assert _rel_err(x, w, deq) < 1.5 * _rel_err(x, w, pruned_only.weight)  # 4 bits add little on top


def test_dead_inputs_zeroed() -> None:
    w, x, _ = _layer_and_inputs(in_f=64)
    x[:, 3] = 0.0
    h, _ = accumulate_hessian(None, x, 0)
    res = sparsegpt_prune(w, h, sparsity=0.25)
    assert bool((res.weight[:, 3] == 0).all()) and torch.isfinite(res.weight).all()
