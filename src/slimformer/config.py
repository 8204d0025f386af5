"""Shared pieces of method configs: strict construction from dicts and common validators."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from slimformer.errors import UserError, shown


@dataclasses.dataclass(frozen=True)
class TargetedConfig:
    """Keys every layer-wise method shares: which linear layers it touches.

    targets: name patterns (full name, dotted suffix, class name, or `re:REGEX`); empty means every
    linear layer inside the Transformer blocks. ignore: patterns removed from that set.
    """

    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()


def build_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """Construct frozen dataclass `cls` from a recipe mapping, rejecting unknown keys and bad types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in set(values) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {_listed(unknown)}; allowed keys: {', '.join(fields)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in values.items()}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError:
                continue
        raise UserError(f"{where}: got {shown(value)}, expected {_describe(hint)}.")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{where}: got {shown(value)}, expected one of {', '.join(map(repr, typing.get_args(hint)))}.")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: got {shown(value)}, expected a list of {_NAMES.get(item, item)}.")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: got {shown(value)}, expected true or false.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: got {shown(value)}, expected an integer.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: got {shown(value)}, expected a number.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: got {shown(value)}, expected a string.")
        return value
    return value


_NAMES = {str: "strings", int: "integers", float: "numbers"}


def _listed(names: list[str], most: int = 5) -> str:
    """The first `most` names, cut to about 100 characters: a mapping can hold many long keys."""
    text = ", ".join(names[:most]) + (", ..." if len(names) > most else "")
    text = text if len(text) <= 100 else text[:97] + "..."
    return text + (f" ({len(names)} in all)" if len(names) > most else "")


def _describe(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint) if a is not type(None))


def check_range(name: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    """UserError unless low <= value <= high (or < high when high_open)."""
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise UserError(f"{name} must be in [{low}, {high}{bracket}, got {value}.")


def check_positive(method: str, config: Any, *keys: str) -> None:
    """UserError naming the method unless each of `keys` on `config` is >= 1."""
    for key in keys:
        value = getattr(config, key)
        if value < 1:
            raise UserError(f"{method}: {key} must be a positive integer, got {value}.")
