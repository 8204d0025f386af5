"""GPTQ math on small random layers: lower output error than RTN on the same inputs."""

from __future__ import annotations

import pytest
import torch

from slimformer.quant.gptq_math import accumulate_hessian, gptq_quantize
from slimformer.quant.qscheme import dequantize, fake_quantize, qrange


def _layer_and_inputs(out_f: int = 48, in_f: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mix = torch.randn(in_f, in_f) * 0.3  # correlated inputs, as real activations are
    x = torch.randn(4096, in_f) @ mix + torch.randn(4096, in_f)
    return torch.randn(out_f, in_f), x


@pytest.mark.parametrize("group_size, act_order", [(32, False), (64, True), (-1, False), (0, False), (128, False)])
def test_gptq_beats_rtn_on_output_error(group_size: int, act_order: bool) -> None:
    w, x = _layer_and_inputs()
    h, n = accumulate_hessian(None, x[:2048], 0)
    h, n = accumulate_hessian(h, x[2048:], n)
    codes, qp = gptq_quantize(w, h, 3, group_size, False, act_order=act_order)
    qmin, qmax = qrange(3, False)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    err_gptq = (x @ (w - dequantize(codes, qp)).T).pow(2).mean()
    err_rtn = (x @ (w - fake_quantize(w, 3, group_size, False)[0]).T).pow(2).mean()
    assert err_gptq < 0.75 * err_rtn


def test_hessian_running_mean_equals_batch() -> None:
    x = torch.randn(300, 16)
    h_all, _ = accumulate_hessian(None, x, 0)
    h, n = None, 0
    for chunk in x.split(70):
        h, n = accumulate_hessian(h, chunk, n)
    assert n == 300 and torch.allclose(h, h_all, atol=1e-5)
    assert torch.allclose(h_all, 2 * x.T @ x / 300, atol=1e-5)


def test_dead_inputs_and_smaller_last_group() -> None:
    w, x = _layer_and_inputs(8, 40)
    x[:, 5] = 0  # an input that never fires
    h, _ = accumulate_hessian(None, x, 0)
    codes, qp = gptq_quantize(w, h, 4, 16, True)  # 40 = 16 + 16 + 8
    assert qp.scale.shape == (8, 3)
    assert bool(torch.isfinite(dequantize(codes, qp)).all())
    assert bool((codes[:, 5] == 0).all())  # dead input column: weight zeroed, code 0 (symmetric)
