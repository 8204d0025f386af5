"""ONNX export of a (compressed) model and an onnxruntime session that evaluates like a torch model.

`export_onnx` swaps every slimformer layer for its ONNX form (`onnx_ops`), traces the model with
PyTorch's TorchScript exporter (opset 17; dynamic batch and sequence axes) and writes the file
atomically. Decoders take (input_ids, attention_mask) and return logits; encoders return
last_hidden_state. `OrtModel` wraps an onnxruntime session behind the same call signature as the
Hugging Face model, so perplexity, embeddings, probes and latency measure it unchanged.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimformer.errors import UserError
from slimformer.export.onnx_ops import INT4_COMPUTE, export_form
from slimformer.outputs import atomic_file

OPSET = 17
OUTPUT_NAMES = {"decoder": "logits", "encoder": "last_hidden_state"}


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


class _KVWrapped(nn.Module):
    """(input_ids, attention_mask, past k/v per layer) -> (logits, present k/v per layer): one graph
    for prefill (past of length 0) and incremental decode. The mask covers past + new tokens;
    positions are counted from it, so left-padded batches keep their positions."""

    def __init__(self, model: nn.Module, n_layers: int) -> None:
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]  # (B, S)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def kv_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(key/value heads, head dim) of each layer's cache, read from a one-token forward (so
    structurally pruned models with per-layer head counts are described as they are)."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layers = getattr(out.past_key_values, "layers", None)
    if not layers:
        raise UserError(f"{type(model).__name__} returns no per-layer key/value cache: export it with kv_cache=False.")
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[-1])) for layer in layers]


def kv_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input names of the past and output names of the present keys/values, layer by layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


def onnx_ready(model: nn.Module, *, int4: bool = True, int4_compute: str = "fp32") -> tuple[nn.Module, int]:
    """A copy of `model` with each slimformer layer replaced by its ONNX form; (copy, layers swapped)."""
    if int4_compute not in INT4_COMPUTE:
        raise UserError(f"int4_compute must be one of {', '.join(INT4_COMPUTE)}, got {int4_compute!r}.")
    model = copy.deepcopy(model).eval()
    swaps = []
    for name, module in model.named_modules():
        form = export_form(module, int4=int4, int4_compute=int4_compute)
        if form is not None:
            swaps.append((name, form))
    for name, form in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, form)
    return model, len(swaps)


def export_onnx(
    model: nn.Module, kind: str, path: str | Path, *, seq: int = 16, int4: bool = True, kv_cache: bool = False,
    int4_compute: str = "fp32",
) -> dict[str, Any]:
    """Write `model` (decoder or encoder) to `path` as ONNX; returns {path, bytes, seconds, layers}.

    int4=False writes 4-bit weight-only layers as dense fp32 MatMuls instead of MatMulNBits.
    int4_compute="int8" sets MatMulNBits' accuracy_level 4: onnxruntime quantizes each layer's
    input to int8 per block and multiplies in integers (fast on CPUs with VNNI); "fp32" (default)
    computes exactly what the PyTorch model computes.
    kv_cache=True (decoders): the graph also takes `past_key_values.{i}.key/value` (batch, heads,
    past, head_dim) and returns `present.{i}.key/value` after `logits`, for incremental decoding;
    the attention mask then spans past + new tokens. An empty past (length 0) is a plain forward.

    The file is written beside `path` under a temporary name and renamed, so a failed export
    leaves nothing behind."""
    if kind not in ("decoder", "encoder"):
        raise UserError(f"ONNX export supports decoder and encoder models, got kind {kind!r}.")
    if kv_cache and kind != "decoder":
        raise UserError(f"kv_cache=True exports a decoder's key/value cache; this model is an {kind}.")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder '{path.parent}' does not exist.")
    start = time.perf_counter()
    ready, swapped = onnx_ready(model, int4=int4, int4_compute=int4_compute)
    vocab = _vocab_size(model)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    field = OUTPUT_NAMES[kind]  # the output's name tells `bench` what a bare .onnx file holds
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            field: {0: "batch", 1: "seq"}}
    wrapped, args, names, outputs = _Wrapped(ready, kind), (ids, mask), ["input_ids", "attention_mask"], [field]
    if kv_cache:
        shapes = kv_shapes(ready)
        past_names, present_names = kv_names(len(shapes))
        past_len = seq // 2 + 1  # unlike seq, so the tracer cannot confuse the two axes
        past = [torch.randn(2, h, past_len, d) for h, d in shapes for _ in (0, 1)]
        wrapped, args = _KVWrapped(ready, len(shapes)), (ids, torch.ones(2, past_len + seq, dtype=torch.long), *past)
        names, outputs = names + past_names, ["logits", *present_names]
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "logits": {0: "batch", 1: "seq"}, **{n: {0: "batch", 2: "past"} for n in past_names},
                **{n: {0: "batch", 2: "total"} for n in present_names}}
    with atomic_file(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python control flow, a screen of them
        torch.onnx.export(wrapped, args, str(tmp), dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=outputs, dynamic_axes=axes, custom_opsets={"com.microsoft": 1})
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - start, 2),
            "layers_swapped": swapped, "opset": OPSET, "kv_cache": kv_cache}


WEIGHT_READERS = ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits", "DequantizeLinear")


def matmul_weight_bytes(path: str | Path) -> int:
    """Bytes of the stored tensors (initializers) that matrix products read in full on every call:
    what one decode step streams from memory for its weights. Embedding lookups (Gather) read one
    row per token and are left out; a tensor used twice is counted once."""
    import onnx

    graph = onnx.load(str(path)).graph
    sizes = {t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer}
    read = {name for node in graph.node if node.op_type in WEIGHT_READERS for name in node.input if name in sizes}
    return sum(sizes[name] for name in read)


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise UserError("ONNX export needs the model's config.vocab_size to build example inputs.")
    return int(vocab)


class OrtModel(nn.Module):
    """An onnxruntime session called like the Hugging Face model it was exported from:
    model(input_ids=..., attention_mask=...) -> .logits (decoder) or .last_hidden_state (encoder)."""

    def __init__(self, path: str | Path, kind: str | None = None, *, config: Any = None, threads: int | None = None) -> None:
        """kind None: read from the file's output name (`logits` or `last_hidden_state`)."""
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise UserError(f"onnxruntime cannot open '{path}': {type(exc).__name__}: {str(exc)[:300]}") from None
        if kind is None:
            first = self.session.get_outputs()[0].name
            kind = next((k for k, name in OUTPUT_NAMES.items() if name == first), None)
            if kind is None:
                raise UserError(f"'{path}': cannot tell a decoder from an encoder (first output {first!r}, expected "
                                f"'logits' or 'last_hidden_state'); re-export it with this slimformer.")
        self.kind, self.path = kind, Path(path)
        self.config = config  # the source model's config (vocab size for latency inputs), if given
        # a kv_cache export: past_key_values.{i}.key/value inputs, (batch, heads, past, head_dim) each
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    @property
    def has_kv_cache(self) -> bool:
        return bool(self.past_inputs)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past keys/values for a prefill through a kv_cache export."""
        return [np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.past_inputs]

    def step(self, input_ids: Tensor, attention_mask: Tensor, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of a kv_cache export: new tokens (B, S), the mask over past + new (B, P + S), the
        past from the previous step (or `empty_past`) -> (logits (B, S, V), present keys/values)."""
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        feeds.update({i.name: p for i, p in zip(self.past_inputs, past)})
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> SimpleNamespace:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.has_kv_cache:
            logits, _ = self.step(input_ids, attention_mask, self.empty_past(input_ids.shape[0]))
            return SimpleNamespace(logits=torch.from_numpy(logits))
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        out = torch.from_numpy(self.session.run(None, feeds)[0])
        return SimpleNamespace(logits=out) if self.kind == "decoder" else SimpleNamespace(last_hidden_state=out)
