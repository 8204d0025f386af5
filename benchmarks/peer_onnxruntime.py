"""onnxruntime's quantizers on our shared ONNX export: quantize_dynamic and MatMulNBits (benchmarks/peers.py)."""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from harness import Bench, PeerError, PeerFn, timed  # benchmarks/harness.py
from torch import nn


class OrtLM(nn.Module):
    """An onnxruntime session behind the call `perplexity` makes: model(input_ids=...).logits."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # same threads as the torch side
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        logits = self.session.run(None, {"input_ids": input_ids.numpy()})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


class _LogitsOnly(nn.Module):
    """forward(input_ids) -> logits, with an all-ones mask: without a mask, transformers 5 looks for
    packed sequences with `aten::diff`, which the TorchScript ONNX exporter cannot export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript exporter, opset 17, dynamic batch. The default (torch.export-based) exporter
    would also need onnxscript; this one needs only onnx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings, a screen of them
        torch.onnx.export(_LogitsOnly(model).eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}})


@dataclass(frozen=True)
class OnnxLM:
    """The exported fp32 LM and the MatMul nodes that quantizers may or may not touch."""

    path: Path
    export_s: float
    targets: list[str]  # the MatMuls of the target Linear layers (names follow the module path)
    others: list[str]  # every other MatMul: attention products, the LM head


def onnx_export(bench: Bench) -> OnnxLM:
    """The fp32 LM exported once per run (before any timed call); a failure is kept and re-raised."""
    if "onnx" not in bench.cache:
        path = bench.workdir / "smollm2-fp32.onnx"
        try:
            _, seconds = timed(lambda: _export(copy.deepcopy(bench.model), bench.eval_windows[:1], path))
            bench.cache["onnx"] = OnnxLM(path, seconds, *_split_matmuls(path, bench))
        except PeerError as exc:
            bench.cache["onnx"] = exc
        except Exception as exc:  # every onnxruntime row reports the same export failure
            bench.cache["onnx"] = PeerError(f"ONNX export failed: {type(exc).__name__}: {exc}")
    if isinstance(bench.cache["onnx"], PeerError):
        raise bench.cache["onnx"]
    return bench.cache["onnx"]


def _split_matmuls(path: Path, bench: Bench) -> tuple[list[str], list[str]]:
    import onnx

    matmuls = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMul"]
    suffixes = tuple({"/" + name.split(".")[-1] + "/MatMul" for name in bench.targets})
    targets = [name for name in matmuls if name.endswith(suffixes)]
    if len(targets) != len(bench.targets):
        raise PeerError(f"found {len(targets)} target MatMul nodes in the ONNX graph, expected {len(bench.targets)}")
    return targets, [name for name in matmuls if name not in set(targets)]


def ort_dynamic(reduce_range: bool) -> PeerFn:
    """onnxruntime quantize_dynamic: int8 per-channel weights, dynamic per-tensor uint8 activations.
    reduce_range keeps weights to 7 bits, which ORT advises on x86 without VNNI, where its U8S8
    integer kernels can saturate."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        lm = onnx_export(bench)
        out = bench.workdir / "ort-dynamic.onnx"
        quantize_dynamic(str(lm.path), str(out), per_channel=True, reduce_range=reduce_range,
                         weight_type=QuantType.QInt8, nodes_to_quantize=lm.targets)
        notes = ["activations dynamic per-tensor uint8", f"+ {lm.export_s:.0f} s shared ONNX export"]
        return out, notes + ([] if reduce_range else [f"this CPU {'has' if _has_vnni() else 'has no'} VNNI"])

    return run


def _has_vnni() -> bool:
    try:
        return any(f in Path("/proc/cpuinfo").read_text() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    except OSError:
        return False


def ort_nbits(group: int) -> PeerFn:
    """onnxruntime MatMulNBitsQuantizer: 4-bit asymmetric RTN blocks of `group` (MatMulNBits op)."""

    def run(model: nn.Module, bench: Bench) -> tuple[Any, list[str]]:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # it logs every node of the graph (7,000 lines) at INFO
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        lm = onnx_export(bench)
        quant = MatMulNBitsQuantizer(str(lm.path), bits=4, block_size=group, is_symmetric=False,
                                     nodes_to_exclude=lm.others)
        quant.process()
        out = bench.workdir / f"ort-nbits-g{group}.onnx"
        quant.model.save_model_to_file(str(out))
        return out, [f"+ {lm.export_s:.0f} s shared ONNX export"]

    return run
