"""The export entry points behind `slimformer export` and a recipe's export stage: ONNX, GGUF,
compressed-tensors and plain Hugging Face folders, each written to a temporary path, checked
against the PyTorch model on real inputs (`parity`) and only then renamed into place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimformer.errors import UserError
from slimformer.evaluate.measure import EvalData, EvalSettings, measure
from slimformer.export.parity import output_parity, parity_inputs
from slimformer.models.loading import ModelBundle, load_bundle, resolve_folder
from slimformer.outputs import atomic_file, check_file_output, check_folder_output, protected_paths
from slimformer.recipe import ExportSpec


def export(
    model: str | Path | ModelBundle, output: str | Path, *, format: str = "onnx", overwrite: bool = False,  # noqa: A002
    threads: int | None = None, dtype: str = "float32", kv_cache: bool = False, int4_compute: str = "fp32",
    unquantized: str = "f32",
) -> dict[str, Any]:
    """Export a model (alias, HF folder or compressed folder) to `output` and check the file against
    the PyTorch model on real inputs (built-in evaluation text: 2 windows of 128 tokens for decoders,
    16 tweets for encoders). Returns {path, bytes, seconds, layers_swapped, opset, parity}.
    format="hf": a plain Hugging Face folder instead (see `save_hf`; `dtype` applies there).
    kv_cache=True (decoders): past/present key/value inputs and outputs for incremental decoding.
    int4_compute="int8": 4-bit layers multiply int8-quantized activations in onnxruntime (faster,
    slightly less exact; the parity check shows by how much); "fp32" (default) is exact.
    format="gguf": a GGUF file for llama.cpp/ollama carrying the integer codes unchanged (see
    `export_gguf_file`); `unquantized` (f32, f16, q8_0) says how layers without codes are stored."""

    if format == "hf":
        return save_hf(model, output, dtype=dtype, overwrite=overwrite)
    if format == "compressed-tensors":
        return save_compressed(model, output, overwrite=overwrite)
    if format not in ("onnx", "gguf"):
        raise UserError(f"unknown export format {format!r}; supported: onnx, gguf, compressed-tensors, hf.")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be a positive integer, got {threads}.")
    if format == "gguf":
        return export_gguf_file(model, output, overwrite=overwrite, unquantized=unquantized, threads=threads)
    source = model.folder if isinstance(model, ModelBundle) else resolve_folder(model)
    out = check_file_output(output, protected=protected_paths(source), overwrite=overwrite)
    bundle = load_bundle(model, dtype="float32") if not isinstance(model, ModelBundle) else model
    with atomic_file(out) as tmp:  # renamed once the parity check passed
        info, _ = export_checked(bundle, tmp, kv_cache=kv_cache, int4_compute=int4_compute, threads=threads)
    return {"model": bundle.name, "kind": bundle.kind, **info, "path": str(out)}


def export_gguf_file(model: str | Path | ModelBundle, output: str | Path, *, overwrite: bool = False,
                     unquantized: str = "f32", threads: int | None = None) -> dict[str, Any]:
    """Write a GGUF file (the architectures of export.gguf_arch): our 4/5/8-bit codes and fp16 scales as
    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks unchanged; what GGUF cannot hold exactly is refused (UserError,
    nothing written). Where llama.cpp is installed, its logits are compared with PyTorch's on real
    text before the file is renamed into place (`parity`)."""
    from slimformer.export.gguf import export_gguf
    from slimformer.export.gguf_parity import gguf_parity

    source = model.folder if isinstance(model, ModelBundle) else resolve_folder(model)
    out = check_file_output(output, protected=protected_paths(source), overwrite=overwrite)
    bundle = load_bundle(model, dtype="float32") if not isinstance(model, ModelBundle) else model
    if bundle.kind != "decoder" or bundle.tokenizer is None:
        raise UserError(f"GGUF export needs a decoder with its tokenizer; '{bundle.name}' is an {bundle.kind}"
                        f"{'' if bundle.tokenizer is not None else ' without a tokenizer'}.")
    with atomic_file(out) as tmp:  # renamed once llama.cpp (where installed) has run it
        info = export_gguf(bundle.model, bundle.tokenizer, tmp, unquantized=unquantized)
        ids, _ = parity_inputs(bundle)
        info["parity"] = gguf_parity(bundle.model, tmp, ids, threads=threads)
    return {"model": bundle.name, "kind": bundle.kind, **info, "path": str(out)}


def export_checked(bundle: ModelBundle, path: Path, *, kv_cache: bool, int4_compute: str,
                    threads: int | None) -> tuple[dict[str, Any], Any]:
    """Write `bundle` to ONNX at `path` and compare onnxruntime's outputs with PyTorch's on real inputs:
    (export info with `parity`, the open onnxruntime session)."""
    from slimformer.export.onnx import OrtModel, export_onnx

    ids, mask = parity_inputs(bundle)  # before writing: a model without a tokenizer fails with nothing written
    info = export_onnx(bundle.model, bundle.kind, path, kv_cache=kv_cache, int4_compute=int4_compute)
    session = OrtModel(path, bundle.kind, config=bundle.model.config, threads=threads)
    info["parity"] = output_parity(bundle.model, session, bundle.kind, ids, mask)
    return info, session


def save_hf(
    model: str | Path | ModelBundle | nn.Module, output: str | Path, *, dtype: str = "float32", overwrite: bool = False,
) -> dict[str, Any]:
    """Write a plain Hugging Face folder (model.safetensors + config + tokenizer) that `transformers`
    loads without slimformer: quantized layers as dense weights in `dtype` (float32, float16,
    bfloat16), input scales folded in, activation quantization dropped (listed in the result's
    `activation_quantization_dropped` and `warnings`). The folder is read back with plain
    transformers and compared with this model on real inputs (`parity`, when a tokenizer is known).
    UserError for models whose config cannot describe them (e.g. non-uniform structural pruning)."""
    from slimformer.export.hf import save_hf_folder
    from slimformer.models.loading import model_kind

    if isinstance(model, nn.Module):
        bundle = ModelBundle(model, None, model_kind(model.config), type(model).__name__)
    else:
        source = model.folder if isinstance(model, ModelBundle) else resolve_folder(model)
        check_folder_output(output, protected=protected_paths(source), overwrite=overwrite)
        bundle = load_bundle(model, dtype="float32") if not isinstance(model, ModelBundle) else model
    info = save_hf_folder(bundle.model, bundle.tokenizer, Path(output), dtype=dtype, overwrite=overwrite)
    if bundle.tokenizer is not None:
        ids, mask = parity_inputs(bundle)
        plain = load_bundle(info["path"], tokenizer=False).model.float()
        info["parity"] = output_parity(bundle.model, plain, bundle.kind, ids, mask)  # runs under inference_mode
    return {"model": bundle.name, "kind": bundle.kind, **info}


def save_compressed(model: str | Path | ModelBundle, output: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write a compressed-tensors Hugging Face folder (what llm-compressor writes and vLLM serves):
    our integer codes packed as `pack-quantized` (weight-only) or `int-quantized` (W8A8), with the
    `quantization_config` transformers and vLLM read. What the format cannot hold is a UserError."""
    from slimformer.export.compressed_tensors import save_compressed_tensors

    source = model.folder if isinstance(model, ModelBundle) else resolve_folder(model)
    out = check_folder_output(output, protected=protected_paths(source), overwrite=overwrite)
    bundle = load_bundle(model, dtype="float32") if not isinstance(model, ModelBundle) else model
    return {"model": bundle.name, "kind": bundle.kind,
            **save_compressed_tensors(bundle.model, bundle.tokenizer, out, overwrite=overwrite)}


def export_stage(bundle: ModelBundle, spec: ExportSpec, folder: Path, data: EvalData, settings: EvalSettings) -> dict[str, Any]:
    """The recipe's export stage: write `folder/model.onnx` (or .gguf), check it against PyTorch on real
    inputs, and measure it in its runtime with the same data and latency settings as the other stages."""
    if spec.format == "gguf":
        return gguf_stage(bundle, spec, folder / spec.file, data, settings)
    path = folder / spec.file
    info, session = export_checked(bundle, path, kv_cache=spec.kv_cache, int4_compute=spec.int4_compute,
                                    threads=settings.threads)
    metrics = measure(ModelBundle(session, bundle.tokenizer, bundle.kind, bundle.name), data, settings)
    for key in ("params", "nonzero_params"):  # a session has no torch parameters to count
        metrics.pop(key, None)
    metrics["size_bytes"] = info["bytes"]
    return {**spec.to_dict(), "file": path.name, "runtime": "onnxruntime", "layers_swapped": info.get("layers_swapped"),
            "opset": info.get("opset"), "export_s": round(info["seconds"], 2), "parity": info["parity"], "metrics": metrics}


def gguf_stage(bundle: ModelBundle, spec: ExportSpec, path: Path, data: EvalData, settings: EvalSettings) -> dict[str, Any]:
    """The GGUF export stage: the file is written and checked like `export --format gguf`; where
    llama.cpp is installed it is measured there on the same windows, else the stage says so."""
    from slimformer.export.gguf import export_gguf
    from slimformer.export.gguf_parity import gguf_parity, llama_cpp_available

    info = export_gguf(bundle.model, bundle.tokenizer, path, unquantized=spec.unquantized)
    ids, _ = parity_inputs(bundle)
    stage = {**spec.to_dict(), "file": path.name, "runtime": "llama.cpp", "tensors": info["tensors"],
             "layers_from_codes": info["layers_from_codes"], "export_s": round(info["seconds"], 2),
             "parity": gguf_parity(bundle.model, path, ids, threads=settings.threads)}
    if llama_cpp_available():
        from slimformer.evaluate.llamacpp import measure_gguf

        stage["metrics"] = measure_gguf(path, data.windows, settings)
    else:
        stage["note"] = "llama.cpp is not installed (`make llamacpp`): the file was written but not measured"
    return stage
