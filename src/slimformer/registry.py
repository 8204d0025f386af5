"""The method registry: a plain dict from recipe `method` name to (config class, function).

Filled by the `@register` decorator in each method's module; the built-in modules are imported
explicitly (by name, below) the first time the registry is read. Nothing is discovered by magic.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slimformer.errors import UserError

# Modules whose import registers the built-in methods. Listed by hand on purpose.
_BUILTIN_MODULES = (
    "slimformer.prune.magnitude",
    "slimformer.prune.wanda",
    "slimformer.prune.sparsegpt",
    "slimformer.prune.gradient",
    "slimformer.prune.structured",
    "slimformer.quant.rtn",
    "slimformer.quant.gptq",
    "slimformer.quant.dynamic",
    "slimformer.quant.awq",
    "slimformer.quant.mixed",
    "slimformer.quant.static",
    "slimformer.quant.smoothquant",
    "slimformer.quant.nonlinear",
    "slimformer.quant.qat",
    "slimformer.train.steps",
)


@dataclass(frozen=True)
class Method:
    """A registered compression method: its name, config dataclass, what it is, and its function."""

    name: str
    config_cls: type
    stage: str  # "prune" | "quant" | "train": pruning or training after quantization is refused
    apply: Callable[..., dict[str, Any]]
    # where it computes on `--device`: "blocks" (the calibration engine moves one block at a time),
    # "model" (forward/backward passes of the whole model: it moves there for the step), "host"
    # (weight-only math where the weights are)
    placement: str = "host"


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, stage: str, placement: str = "host") -> Callable:
    """Register `fn(model, config, ctx) -> step info dict` as recipe method `name`."""
    if placement not in ("blocks", "model", "host"):
        raise ValueError(f"placement must be blocks, model or host, got {placement!r}")

    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in METHODS:
            raise RuntimeError(f"method '{name}' registered twice")
        METHODS[name] = Method(name, config_cls, stage, fn, placement)
        return fn

    return deco


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get_method(name: str) -> Method:
    """The method registered as `name`; UserError listing the known ones otherwise."""
    _load_builtins()
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def known_methods() -> list[str]:
    """Names of all registered methods."""
    _load_builtins()
    return sorted(METHODS)
