"""FakeQuantLinear, prepare_qat and convert_qat on tiny layers and a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimformer.config import build_config
from slimformer.errors import UserError
from slimformer.quant.gptq import GPTQConfig, gptq
from slimformer.quant.qat import QATConfig, prepare_qat
from slimformer.quant.qat_modules import FakeQuantLinear, convert_qat
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import compute_qparams
from qat_tiny import tiny_ctx, tiny_llama


@pytest.mark.parametrize("group_size,symmetric", [(4, False), (-1, True), (0, False), (3, True)])
def test_fake_quant_linear_at_rtn_init_computes_the_rtn_layer_exactly(group_size: int, symmetric: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    fq = FakeQuantLinear.from_linear(lin, compute_qparams(lin.weight.data, 3, group_size, symmetric), lsq=True)
    ref = QuantLinear.from_float(lin, bits=3, group_size=group_size, symmetric=symmetric)
    x = torch.randn(5, 10)
    assert torch.equal(fq.fake_weight(), ref.dequantized_weight())
    assert torch.equal(fq(x), ref(x))


@pytest.mark.parametrize("lsq,symmetric", [(True, False), (True, True), (False, False)])
def test_converted_layer_computes_what_the_trained_fake_quant_layer_computes(lsq: bool, symmetric: bool) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(12, 7)
    fq = FakeQuantLinear.from_linear(lin, compute_qparams(lin.weight.data, 2, 5, symmetric), lsq=lsq)
    opt = torch.optim.Adam(fq.parameters(), lr=3e-3)
    x, target = torch.randn(16, 12), torch.randn(16, 7)
    for _ in range(20):  # move weights, scales and zeros off their initial grid
        opt.zero_grad()
        ((fq(x) - target) ** 2).mean().backward()
        opt.step()
    if lsq:
        assert not torch.equal(fq.scale.half(), compute_qparams(lin.weight.data, 2, 5, symmetric).scale)
        assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    q = fq.to_quant_linear()
    assert isinstance(q, QuantLinear) and q.codes.dtype == torch.int16 and q.scale.dtype == torch.float16
    assert torch.equal(q(x), fq(x))


def test_fixed_scales_are_buffers_and_lsq_scales_are_parameters() -> None:
    lin = nn.Linear(8, 4)
    qp = compute_qparams(lin.weight.data, 4, -1, False)
    fixed = FakeQuantLinear.from_linear(lin, qp, lsq=False)
    learned = FakeQuantLinear.from_linear(lin, qp, lsq=True)
    assert {n for n, _ in fixed.named_parameters()} == {"latent", "bias"}
    assert {n for n, _ in learned.named_parameters()} == {"latent", "bias", "scale", "zero"}
    assert {n for n, _ in fixed.named_buffers()} == {"scale", "zero"}


@pytest.fixture(scope="module")
def tiny():
    """(tiny random Llama, step context on byte-tokenized lee-news)."""
    return tiny_llama(), tiny_ctx()


def test_prepare_from_gptq_computes_exactly_gptqs_model_and_converts_back(tiny) -> None:
    model, ctx = tiny
    cfg = QATConfig(bits=3, group_size=16, init="gptq", num_samples=4, seq_len=64, ignore=("o_proj",))
    ids = torch.randint(0, 128, (2, 24))
    ref = copy.deepcopy(model)
    gptq(ref, GPTQConfig(bits=3, group_size=16, num_samples=4, seq_len=64, ignore=("o_proj",)), ctx)
    want = ref(input_ids=ids).logits

    student = copy.deepcopy(model)
    info = prepare_qat(student, cfg, ctx)
    assert info == {"layers": 12, "init": "gptq", "calib_windows": 4}
    assert sum(isinstance(m, FakeQuantLinear) for m in student.modules()) == 12
    assert isinstance(student.model.layers[0].self_attn.o_proj, nn.Linear)
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    assert convert_qat(student) == 12
    for name, m in ref.named_modules():
        if isinstance(m, QuantLinear):
            got = student.get_submodule(name)
            assert torch.equal(got.codes, m.codes) and torch.equal(got.scale, m.scale) and torch.equal(got.zero, m.zero)


def test_prepare_refuses_already_quantized_layers(tiny) -> None:
    model, ctx = tiny
    student = copy.deepcopy(model)
    prepare_qat(student, QATConfig(bits=4, group_size=-1, init="rtn"), ctx)
    with pytest.raises(UserError, match="already quantized"):
        prepare_qat(student, QATConfig(bits=4, group_size=-1, init="rtn"), ctx)


@pytest.mark.parametrize("values,message", [
    ({"bits": 1}, "bits must be an integer from 2 to 8"),
    ({"lr": 0}, "lr must be"),
    ({"lr": -1e-4}, "lr must be"),
    ({"init": "awq"}, "init"),
    ({"temperature": 0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"steps": 0}, "steps"),
    ({"group_size": -2}, "group_size"),
    ({"learning_rate": 1e-4}, "unknown key"),
])
def test_bad_values_are_user_errors(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config(QATConfig, values, "qat")
