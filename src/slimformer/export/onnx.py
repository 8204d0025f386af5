"""ONNX export of a (compressed) model and an onnxruntime session that evaluates like a torch model.

`export_onnx` swaps every slimformer layer for its ONNX form (`onnx_ops`), traces the model with
PyTorch's TorchScript exporter (opset 17; dynamic batch and sequence axes) and writes the file
atomically. Decoders take (input_ids, attention_mask) and return logits; encoders return
last_hidden_state. `OrtModel` wraps an onnxruntime session behind the same call signature as the
Hugging Face model, so perplexity, embeddings, probes and latency measure it unchanged.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from slimformer.errors import UserError
from slimformer.export.onnx_ops import export_form

OPSET = 17


class _Wrapped(nn.Module):
    """(input_ids, attention_mask) -> logits (decoder) or last_hidden_state (encoder).

    The mask is an input even for decoders: without one, transformers looks for packed sequences
    with `aten::diff`, which the TorchScript exporter cannot write."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.kind == "decoder":
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_ready(model: nn.Module, *, int4: bool = True) -> tuple[nn.Module, int]:
    """A copy of `model` with each slimformer layer replaced by its ONNX form; (copy, layers swapped)."""
    model = copy.deepcopy(model).eval()
    swaps = []
    for name, module in model.named_modules():
        form = export_form(module, int4=int4)
        if form is not None:
            swaps.append((name, form))
    for name, form in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, form)
    return model, len(swaps)


def export_onnx(model: nn.Module, kind: str, path: str | Path, *, seq: int = 16, int4: bool = True) -> dict[str, Any]:
    """Write `model` (decoder or encoder) to `path` as ONNX; returns {path, bytes, seconds, layers}.

    int4=False writes 4-bit weight-only layers as dense fp32 MatMuls instead of MatMulNBits.

    The file is written beside `path` under a temporary name and renamed, so a failed export
    leaves nothing behind."""
    if kind not in ("decoder", "encoder"):
        raise UserError(f"ONNX export supports decoder and encoder models, got kind {kind!r}.")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder '{path.parent}' does not exist.")
    start = time.perf_counter()
    ready, swapped = onnx_ready(model, int4=int4)
    vocab = _vocab_size(model)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "output": {0: "batch", 1: "seq"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python control flow, a screen of them
            torch.onnx.export(_Wrapped(ready, kind), (ids, mask), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["input_ids", "attention_mask"], output_names=["output"],
                              dynamic_axes=axes, custom_opsets={"com.microsoft": 1})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - start, 2),
            "layers_swapped": swapped, "opset": OPSET}


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise UserError("ONNX export needs the model's config.vocab_size to build example inputs.")
    return int(vocab)


class OrtModel(nn.Module):
    """An onnxruntime session called like the Hugging Face model it was exported from:
    model(input_ids=..., attention_mask=...) -> .logits (decoder) or .last_hidden_state (encoder)."""

    def __init__(self, path: str | Path, kind: str, *, config: Any = None, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.kind, self.path = kind, Path(path)
        self.config = config  # the source model's config (vocab size for latency inputs), if given

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> SimpleNamespace:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        out = torch.from_numpy(self.session.run(None, feeds)[0])
        return SimpleNamespace(logits=out) if self.kind == "decoder" else SimpleNamespace(last_hidden_state=out)


@torch.inference_mode()
def parity(model: nn.Module, ort_model: OrtModel, ids: Tensor, mask: Tensor) -> dict[str, float]:
    """How closely the onnxruntime session reproduces the PyTorch model on (ids, mask): cosine of the
    flattened outputs, max and mean absolute error over the positions the mask keeps."""
    from slimformer.quant.int8_kernels import emulate_int_mm

    field = "logits" if ort_model.kind == "decoder" else "last_hidden_state"
    with emulate_int_mm(model):  # the same integer products, in fp32 (see int8_kernels)
        ref = getattr(model(input_ids=ids, attention_mask=mask), field).float()
    got = getattr(ort_model(input_ids=ids, attention_mask=mask), field).float()
    keep = mask.bool()
    ref, got = ref[keep], got[keep]
    err = (got - ref).abs()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    return {"cosine": round(float(cosine), 6), "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean())}
