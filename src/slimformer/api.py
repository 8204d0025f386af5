"""The Python API: `compress`, `evaluate`, `load`, and the export entry points of `export/entry.py`
(`export`, `save_hf`, `save_compressed`, `export_gguf_file`). The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimformer.artifact import save_artifact
from slimformer.checkpoint import fingerprint, holds_finished, open_checkpoints
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.errors import UserError
from slimformer.evaluate.distribution import Comparison, compare_distributions, distribution_inputs
from slimformer.evaluate.measure import DEFAULT_CALIB, EvalData, EvalSettings, measure, prepare_eval
from slimformer.evaluate.report import environment, metrics_table, plot_report, report_markdown
from slimformer.evaluate.size import folder_bytes
from slimformer.export.entry import export, export_gguf_file, export_stage, save_compressed, save_hf
from slimformer.models.layout import select_linears
from slimformer.models.loading import ModelBundle, load_bundle, resolve_folder
from slimformer.models.placement import check_runs_on, dtype_name, model_dtype, peak_memory, resolve_device, resolve_dtype
from slimformer.outputs import OutputLock, atomic_folder, check_folder_output, no_space_error, protected_paths
from slimformer.quant.qscheme import check_group_fits
from slimformer.recipe import Recipe
from slimformer.registry import get_method


def load(path: str | Path) -> nn.Module:
    """Load a model (compressed output folder, HF folder, or alias) in eval mode, without pickle."""
    return load_bundle(path, tokenizer=False).model


def compress(
    model: str | Path | ModelBundle,
    recipe: Recipe | dict | str | Path,
    calib: str | None = None,
    eval: str | EvalSettings | None = None,  # noqa: A002 - the contract's name
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Run `recipe` on `model`, measure before/after, and (with `output`) write the folder.

    `dtype`: what a Hugging Face folder loads in (`auto`: its checkpoint's own). `device`: where the
    math runs (`auto`: a GPU when torch sees one): layer-wise methods move one block at a time there
    while the model stays on the host; whole-model steps and the measurements move the model there.

    Returns the report dict (see docs). The input model is never modified: a loaded bundle is
    deep-copied first, an output that is or holds the input is refused, and output goes to a
    temporary sibling renamed only when complete. One run at a time holds an output (a lock beside
    it). With `output`, layer-wise steps save each finished block in the hidden sibling
    `.<output>.resume/` (removed on success); `resume=True` continues from there.
    """
    started = time.perf_counter()
    recipe = Recipe.coerce(recipe)
    compute = resolve_device(device)  # bad --device/--dtype fail before anything is read
    resolve_dtype(dtype)
    main = _start_distributed()  # under torchrun: every rank runs the steps, rank 0 alone measures and writes
    if resume and output is None:
        raise UserError("resume needs an output folder: the checkpoint lives beside it.")
    source = model.folder if isinstance(model, ModelBundle) else resolve_folder(model)
    out_dir = None if output is None else check_folder_output(output, protected=protected_paths(source),
                                                              overwrite=overwrite)
    with OutputLock(out_dir) if out_dir is not None and main else contextlib.nullcontext():
        return _compress(model, recipe, calib, eval, out_dir, overwrite=overwrite, progress=progress,
                         resume=resume, main=main, started=started, device=compute, dtype=dtype)


def _compress(model: str | Path | ModelBundle, recipe: Recipe, calib: str | None, eval: str | EvalSettings | None,  # noqa: A002
              out_dir: Path | None, *, overwrite: bool, progress: bool, resume: bool, main: bool,
              started: float, device: torch.device, dtype: str) -> dict[str, Any]:
    """`compress` once its output is checked and locked: everything the input can be faulted for is
    found before the first measurement."""
    settings = eval if isinstance(eval, EvalSettings) else EvalSettings(data=eval, progress=progress)
    settings = dataclasses.replace(settings, device=device)
    bundle = load_bundle(model, dtype=dtype) if not isinstance(model, ModelBundle) else model
    check_runs_on(model_dtype(bundle.model), device)
    calib_name = calib or DEFAULT_CALIB[bundle.kind]
    root = out_dir.parent / f".{out_dir.name}.resume" if out_dir is not None else None
    digest = fingerprint(model=bundle.name, source=_source_identity(bundle), recipe=recipe.to_dict(), calib=calib_name)
    if root is not None and main:
        open_checkpoints(root, digest, resume)  # a damaged or foreign checkpoint is refused now
    calib_data = load_data(calib_name, "calib")
    data = prepare_eval(bundle, settings)
    # the recipe works on a copy only when the original is still needed afterwards: the caller's
    # own model, a training step's teacher, the distribution comparison (else a copy doubles RSS)
    keep = isinstance(model, ModelBundle) or settings.distribution or any(
        get_method(s.method).stage == "train" for s in recipe.steps)
    work = copy.deepcopy(bundle.model) if keep else bundle.model
    _check_fits(recipe, work, bundle)
    _check_calibration(recipe, bundle, calib_data)
    _barrier()
    ctx = StepContext(tokenizer=bundle.tokenizer, kind=bundle.kind, calib=calib_data, progress=progress and main,
                      teacher=bundle.model if keep else None, resume=resume, fingerprint=digest, device=device)
    done = False
    try:
        report = _run_recipe(bundle, work, recipe, ctx, root, data, settings, main, calib_name)
        if main:
            _finish(report, bundle, work, recipe, out_dir, data, settings, overwrite, started)
        done = True
        return report
    except UserError:
        if root is not None and main:  # bad input (e.g. NaNs in calibration) leaves nothing behind
            shutil.rmtree(root, ignore_errors=True)
        raise
    except Exception as exc:  # a full disk is the user's to fix (exit 2); anything else stays internal
        full = no_space_error(exc, out_dir or Path(tempfile.gettempdir()), _state_bytes(work))
        if full is not None:
            kept = " Finished blocks are kept: rerun with --resume." if root is not None and holds_finished(root) else ""
            raise UserError(f"{full}{kept}") from None
        raise
    finally:
        if root is not None and main and (done or not holds_finished(root)):
            shutil.rmtree(root, ignore_errors=True)


def _check_fits(recipe: Recipe, work: nn.Module, bundle: ModelBundle) -> None:
    """The recipe's patterns match layers of this model and its group sizes fit them: checked before
    any measurement, so a recipe that cannot run fails in seconds."""
    if recipe.export is not None and recipe.export.kv_cache and bundle.kind != "decoder":
        raise UserError(f"export.kv_cache: only decoders have a key/value cache; '{bundle.name}' is an {bundle.kind}.")
    for i, step in enumerate(recipe.steps):
        layers = select_linears(work, step.config.targets, step.config.ignore)
        group = getattr(step.config, "group_size", None)
        quantizes = getattr(step.config, "bits", 0) is not None  # sparsegpt without bits has no groups
        if quantizes and isinstance(group, int) and group > 0:
            check_group_fits(group, layers, f"step {i + 1} ({step.method})")


def _check_calibration(recipe: Recipe, bundle: ModelBundle, calib: Any) -> None:
    """A decoder's calibration text must fill one window of the longest `seq_len` a step asks for:
    found here, not after the baseline measurement."""
    lengths = [step.config.seq_len for step in recipe.steps if isinstance(getattr(step.config, "seq_len", None), int)]
    if bundle.kind == "decoder" and lengths and bundle.tokenizer is not None:
        lm_windows(bundle.tokenizer, calib.joined(), max(lengths), max_windows=1, purpose="calibration")


def _run_recipe(bundle: ModelBundle, work: nn.Module, recipe: Recipe, ctx: StepContext, root: Path | None,
                data: EvalData, settings: EvalSettings, main: bool, calib_name: str) -> dict[str, Any]:
    """Measure the input, apply every step to `work` (measuring after each with step metrics on), and
    return the report so far (`compressed` is filled in by `_finish`)."""
    baseline = measure(bundle, data, settings) if main else {}
    if main:
        baseline["size_bytes"] = _source_bytes(bundle)

    def between_steps(i: int, info: dict[str, Any]) -> None:
        if main and settings.step_metrics and i < len(recipe.steps) - 1:  # the last one is `compressed`
            info["metrics"] = _step_metrics(bundle, work, data, settings)

    steps = recipe.apply(work, dataclasses.replace(ctx, checkpoint=None), checkpoints=root, after_step=between_steps)
    if not main:  # the other torchrun ranks took part in training; rank 0 reports
        return {"model": bundle.name, "recipe": recipe.to_dict(), "steps": steps, "rank": _rank()}
    return {
        "model": bundle.name, "recipe": recipe.to_dict(), "eval_data": data.name, "calib_data": calib_name,
        "baseline": baseline, "compressed": None, "steps": steps, "environment": environment(),
        "dtype": dtype_name(model_dtype(bundle.model)), "device": str(ctx.device),
    }


def _finish(report: dict[str, Any], bundle: ModelBundle, work: nn.Module, recipe: Recipe, out_dir: Path | None,
            data: EvalData, settings: EvalSettings, overwrite: bool, started: float) -> None:
    """Measure the compressed model into `report`, run the export stage, and write the output folder."""
    compressed_bundle = ModelBundle(work, bundle.tokenizer, bundle.kind, bundle.name)
    compressed = measure(compressed_bundle, data, settings)
    report["compressed"] = compressed
    steps = report["steps"]
    if settings.step_metrics and len(steps) > 1:
        steps[-1]["metrics"] = compressed  # the same dict: size_bytes lands in both when the folder is saved
    dist = _distributions(bundle, work, data, settings) if settings.distribution else None
    if dist is not None:
        report["distribution"] = dist.to_json()
    report["memory"] = peak_memory(settings.device)  # the whole run's peaks: load, steps, measurements
    if out_dir is None:
        compressed["size_bytes"] = _saved_bytes(compressed_bundle, recipe)
        if recipe.export is not None:  # measured from a temporary file: no folder to keep it in
            with tempfile.TemporaryDirectory(prefix="slimformer-export-") as tmp:
                report["export"] = export_stage(compressed_bundle, recipe.export, Path(tmp), data, settings)
        report["wall_s"] = round(time.perf_counter() - started, 2)
        return
    _write_output(out_dir, compressed_bundle, recipe, report, started, overwrite, dist,
                  lambda folder: export_stage(compressed_bundle, recipe.export, folder, data, settings)
                  if recipe.export is not None else None)


def evaluate(model: str | Path | ModelBundle, eval: str | EvalSettings | None = None, *, progress: bool = True,  # noqa: A002
             device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """Measure one model (alias, HF folder, compressed folder, or a .gguf file run in llama.cpp):
    quality, size, speed. `device`/`dtype` as in `compress` (a .gguf file runs in llama.cpp)."""
    settings = eval if isinstance(eval, EvalSettings) else EvalSettings(data=eval, progress=progress)
    settings = dataclasses.replace(settings, device=resolve_device(device))
    resolve_dtype(dtype)
    if isinstance(model, (str, Path)) and str(model).endswith(".gguf"):
        from slimformer.evaluate.llamacpp import evaluate_gguf

        return {**evaluate_gguf(model, settings), "environment": environment()}
    bundle = load_bundle(model, dtype=dtype) if not isinstance(model, ModelBundle) else model
    check_runs_on(model_dtype(bundle.model), settings.device)
    data = prepare_eval(bundle, settings)
    metrics = measure(bundle, data, settings)
    metrics["size_bytes"] = _source_bytes(bundle)
    return {"model": bundle.name, "eval_data": data.name, "metrics": metrics, "environment": environment(),
            "dtype": dtype_name(model_dtype(bundle.model)), "device": str(settings.device),
            "memory": peak_memory(settings.device)}


def _step_metrics(bundle: ModelBundle, work: nn.Module, data: EvalData, settings: EvalSettings) -> dict[str, Any]:
    """The model after one step of several, measured like `compressed` (size: as it would be saved)."""
    current = ModelBundle(work, bundle.tokenizer, bundle.kind, bundle.name)
    metrics = measure(current, data, settings)
    metrics["size_bytes"] = _saved_bytes(current, None)
    return metrics


def _distributions(bundle: ModelBundle, work: nn.Module, data: EvalData, settings: EvalSettings) -> Comparison:
    """Per-layer weight/activation stats of the input and the compressed model on the same inputs."""
    ids, mask, inputs = distribution_inputs(bundle.tokenizer, data.windows, data.texts, settings.distribution_windows)
    return compare_distributions({"baseline": bundle.model.eval(), "compressed": work.eval()}, ids, mask, inputs)


def _start_distributed() -> bool:
    """Start torch.distributed when launched by torchrun; True on the rank that measures and writes."""
    from slimformer.train import dist

    dist.init_distributed()
    return dist.is_main()


def _barrier() -> None:
    from slimformer.train import dist

    dist.barrier()


def _rank() -> int:
    from slimformer.train import dist

    return dist.rank()


def _source_identity(bundle: ModelBundle) -> dict[str, Any] | None:
    """What identifies the input's contents for the resume fingerprint, cheaply: each file's name,
    size and modification time (a changed model folder does not resume another model's blocks)."""
    if bundle.folder is None:
        return None
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(bundle.folder).iterdir()) if p.is_file()}


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as held in memory: an upper bound of what its artifact needs."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _source_bytes(bundle: ModelBundle) -> int:
    if bundle.folder is not None:
        return folder_bytes(bundle.folder)
    return _saved_bytes(bundle, None)


def _saved_bytes(bundle: ModelBundle, recipe: Recipe | None) -> int:
    with tempfile.TemporaryDirectory(prefix="slimformer-size-") as tmp:
        return save_artifact(bundle.model, Path(tmp), kind=bundle.kind,
                             extra={"recipe": recipe.to_dict()} if recipe else None)


def _write_output(out: Path, bundle: ModelBundle, recipe: Recipe, report: dict, started: float, overwrite: bool,
                  dist: Comparison | None = None, export: Callable[[Path], dict | None] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:  # `out` was checked up front: absent, empty, or --overwrite
        report["compressed"]["size_bytes"] = save_artifact(
            bundle.model, tmp, kind=bundle.kind, tokenizer=bundle.tokenizer,
            extra={"recipe": recipe.to_dict(), "source_model": bundle.name},
        )
        exported = export(tmp) if export is not None else None
        if exported is not None:
            report["export"] = exported
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        report["wall_s"] = round(time.perf_counter() - started, 2)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(report_markdown(report))
        plot_report(report, tmp / "report.png")
        if dist is not None:
            dist.plot(tmp / "distribution.png")


def summary_table(report: dict[str, Any]) -> str:
    """The before/after table printed at the end of `compress`."""
    return metrics_table({"baseline": report["baseline"], "compressed": report["compressed"]})


__all__ = ["compress", "evaluate", "export", "export_gguf_file", "load", "save_compressed", "save_hf", "summary_table"]
