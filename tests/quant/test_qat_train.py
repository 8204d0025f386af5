"""The `qat` step on a tiny random Llama: GPTQ init + distillation lowers the loss, output is QuantLinear."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_llama as shared_llama  # tests/tiny.py

from slimformer.data.windows import lm_windows
from slimformer.quant.gptq import GPTQConfig, gptq
from slimformer.quant.qat import QATConfig, qat
from slimformer.quant.qat_modules import FakeQuantLinear
from slimformer.quant.qlinear import QuantLinear
from slimformer.train.losses import kd_loss
from qat_tiny import tiny_ctx, tiny_llama


def _kd(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


@pytest.mark.parametrize("lsq,ratio", [(True, 0.7), (False, 0.95)])
def test_qat_from_gptq_lowers_the_distillation_loss(lsq: bool, ratio: float) -> None:
    teacher, ctx = tiny_llama(), tiny_ctx()
    ids = lm_windows(ctx.tokenizer, ctx.calib.joined(), 64, 8)  # the training windows

    ptq = copy.deepcopy(teacher)
    gptq(ptq, GPTQConfig(bits=2, group_size=16, num_samples=8, seq_len=64), ctx)
    student = copy.deepcopy(teacher)
    info = qat(student, QATConfig(bits=2, group_size=16, init="gptq", lsq=lsq, steps=30, lr=5e-3, batch_size=4,
                                  num_samples=8, seq_len=64, warmup_steps=2), ctx)
    assert info["layers"] == info["converted"] == 14 and info["train_windows"] == 8
    assert sum(isinstance(m, QuantLinear) for m in student.modules()) == 14
    assert not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    before, after = _kd(ptq, teacher, ids), _kd(student, teacher, ids)
    assert after < ratio * before, (before, after)  # measured: 0.58x (LSQ), 0.86x (fixed scales)
    assert info["loss_last"] < info["loss_first"]


def test_pruned_zeros_stay_zero_and_the_artifact_reloads(tmp_path) -> None:
    from slimformer.artifact import load_artifact, save_artifact
    from slimformer.prune.magnitude import MagnitudeConfig, magnitude

    model, ctx = tiny_llama(), tiny_ctx()
    magnitude(model, MagnitudeConfig(sparsity=0.5))
    zeros = {n: m.weight.detach() == 0 for n, m in model.named_modules() if n.endswith("proj")}
    info = qat(model, QATConfig(bits=4, group_size=16, init="rtn", steps=3, lr=1e-2, batch_size=2, num_samples=4,
                                seq_len=32), ctx)
    assert info["converted"] == 14
    for name, was_zero in zeros.items():
        w = model.get_submodule(name).dequantized_weight()
        assert bool((w[was_zero] == 0).all()), name  # pruned: still exactly zero after training
    ids = torch.randint(0, 128, (2, 16))
    save_artifact(model, tmp_path, kind="decoder")
    loaded, kind = load_artifact(tmp_path)
    with torch.no_grad():
        assert kind == "decoder" and torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_qat_recipe_end_to_end_through_compress(tmp_path) -> None:
    import json

    import transformers

    import slimformer
    from slimformer.evaluate.measure import EvalSettings
    from slimformer.models.zoo import resolve_alias

    tok = transformers.AutoTokenizer.from_pretrained(resolve_alias("smollm2-135m"), local_files_only=True)
    model = shared_llama(0, vocab_size=tok.vocab_size, max_position_embeddings=1024)
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    recipe = {"steps": [{"method": "qat", "bits": 4, "group_size": 8, "init": "gptq", "num_samples": 2, "seq_len": 32,
                         "steps": 2, "batch_size": 2, "lr": 1e-3}]}
    report = slimformer.compress(tmp_path / "llama", recipe, eval=EvalSettings(max_windows=1, latency=False, progress=False),
                                 output=tmp_path / "out", progress=False)
    step = report["steps"][0]
    assert step["method"] == "qat" and step["converted"] == 14 and step["calib_windows"] == 2 and step["steps"] == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    packed = [m for m in manifest["modules"].values() if m["class"] == "QuantLinear"]
    assert len(packed) == 14 and all(m["bits"] == 4 and m["group_size"] == 8 for m in packed)
    loaded = slimformer.load(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
