"""Recipes: an ordered list of compression steps, YAML <-> frozen method configs.

```yaml
steps:
  - method: magnitude
    sparsity: 0.2
  - method: rtn
    bits: 8
    group_size: -1
export:              # optional: also write model.onnx, run it in onnxruntime and measure it
  format: onnx
  int4_compute: fp32 # fp32 (exact) | int8 (4-bit layers multiply int8 activations)
  kv_cache: false
```
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from slimformer.config import build_config
from slimformer.errors import UserError, shown
from slimformer.models.placement import onloaded
from slimformer.registry import get_method


@dataclass(frozen=True)
class Step:
    """One recipe step: a registered method name and its validated config."""

    method: str
    config: Any

    def to_dict(self) -> dict[str, Any]:
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}
        return {"method": self.method, **values}


@dataclass(frozen=True)
class ExportSpec:
    """The recipe's optional last stage: the compressed model is also written as `model.onnx` (or
    `model.gguf`) in the output folder, checked against PyTorch, and measured in onnxruntime (or
    llama.cpp) like every other stage. int4_compute and kv_cache (onnx) and unquantized (gguf) mean
    what they mean for `slimformer export`."""

    format: Literal["onnx", "gguf"] = "onnx"
    int4_compute: Literal["fp32", "int8"] = "fp32"
    kv_cache: bool = False
    unquantized: Literal["f32", "f16", "q8_0"] = "f32"

    def __post_init__(self) -> None:
        if self.format == "gguf" and (self.kv_cache or self.int4_compute != "fp32"):
            raise UserError("export: kv_cache and int4_compute are ONNX settings; a GGUF file always decodes "
                            "with llama.cpp's key/value cache and its own kernels: remove them.")
        if self.format == "onnx" and self.unquantized != "f32":
            raise UserError("export: unquantized is a GGUF setting; remove it or use format: gguf.")

    @property
    def file(self) -> str:
        return f"model.{self.format}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Recipe:
    """An ordered, validated list of steps, and optionally an export stage after them."""

    steps: tuple[Step, ...]
    export: ExportSpec | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        """Build and validate a recipe from parsed YAML/JSON data."""
        if not isinstance(data, dict) or set(data) - {"steps", "export"} or "steps" not in data:
            found = shown(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{where}: expected a mapping with the key 'steps' (a list of steps) and optionally "
                            f"'export', found {found}.")
        raw = data["steps"]
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where}: 'steps' must be a non-empty list of steps, found {shown(raw)}.")
        steps = []
        for i, entry in enumerate(raw):
            at = f"{where}: step {i + 1}"
            if not isinstance(entry, dict) or "method" not in entry:
                raise UserError(f"{at}: expected a mapping with a 'method' key, found {shown(entry)}.")
            values = dict(entry)
            name = values.pop("method")
            if not isinstance(name, str):
                raise UserError(f"{at}: 'method' must be a string, found {shown(name)}.")
            method = get_method(name)
            steps.append(Step(name, build_config(method.config_cls, values, f"{at} ({name})")))
        recipe = cls(tuple(steps), _export_spec(data.get("export"), where))
        recipe._check_order(where)
        return recipe

    def _check_order(self, where: str) -> None:
        quantized_at = None
        for i, step in enumerate(self.steps):
            stage = get_method(step.method).stage
            if stage == "quant":
                if quantized_at is not None:
                    raise UserError(
                        f"{where}: step {i + 1} ({step.method}) quantizes weights already quantized by "
                        f"step {quantized_at + 1}; use one quantization step."
                    )
                quantized_at = i
            elif stage == "prune" and quantized_at is not None:
                raise UserError(
                    f"{where}: step {i + 1} ({step.method}) prunes after quantization (step "
                    f"{quantized_at + 1}); put pruning steps before quantization."
                )
            elif stage == "train" and quantized_at is not None:
                raise UserError(
                    f"{where}: step {i + 1} ({step.method}) trains float weights after quantization (step "
                    f"{quantized_at + 1}); put training steps before quantization (or train with `qat`)."
                )

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> "Recipe":
        """Parse YAML text into a validated recipe."""
        try:
            _refuse_aliases(text, where)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{where}: not valid YAML: {exc}".replace("\n", " ")) from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read and validate a recipe file."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"recipe '{path}' is a folder, not a recipe file; give the path of a .yaml file.")
        if not path.is_file():
            raise UserError(f"recipe file '{path}' does not exist.")
        return cls.from_yaml(path.read_text(encoding="utf-8"), where=str(path))

    @classmethod
    def coerce(cls, recipe: "Recipe | dict | str | Path") -> "Recipe":
        """Accept a Recipe, a dict, a path to a YAML file, or YAML text."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yaml", ".yml"))):
            return cls.load(recipe)
        if isinstance(recipe, str):
            return cls.from_yaml(recipe)
        raise UserError(f"recipe must be a Recipe, a dict, YAML text or a .yaml path, got {type(recipe).__name__}.")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": [s.to_dict() for s in self.steps]}
        if self.export is not None:
            out["export"] = self.export.to_dict()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def apply(self, model: Any, ctx: Any = None, *, checkpoints: Path | None = None,
              after_step: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run every step on `model` in place, in order (the export stage is not run here).

        Returns one dict per step: the method, its recipe keys, what the method returned, wall_s.
        ctx: the StepContext the methods read (tokenizer, calibration data...); with `checkpoints`,
        step i saves and resumes its blocks under checkpoints/step{i}. after_step(i, info) runs
        after each step (e.g. to measure the model between steps)."""
        infos = []
        for i, step in enumerate(self.steps):
            start = time.perf_counter()
            step_ctx = dataclasses.replace(ctx, checkpoint=checkpoints / f"step{i}") if checkpoints else ctx
            method = get_method(step.method)
            device = getattr(ctx, "device", None) if method.placement == "model" else None
            with onloaded(model, device):  # whole-model passes run on the device; "blocks" onload one at a time
                info = method.apply(model, step.config, step_ctx)
            infos.append({"method": step.method, **step.to_dict(), **info,
                          "wall_s": round(time.perf_counter() - start, 2)})
            if after_step is not None:
                after_step(i, infos[-1])
        return infos


def _refuse_aliases(text: str, where: str) -> None:
    """UserError if the YAML uses anchors or aliases. A few hundred bytes of nested aliases
    ("billion laughs") expand into billions of values once anything walks or prints them."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise UserError(f"{where}: recipe uses YAML anchors/aliases (&/*), which recipes do not allow; "
                            f"write the values out (line {event.start_mark.line + 1}).")


def _export_spec(raw: Any, where: str) -> ExportSpec | None:
    """The optional `export:` mapping ({} or `true`: ONNX with the defaults)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: 'export' must be a mapping such as {{format: onnx}}, found {shown(raw)}.")
    return build_config(ExportSpec, raw, f"{where}: export")
