"""Nested state (an optimizer's `state_dict()`) as safetensors + JSON, so that nothing is ever unpickled.

`flatten` splits a tree of dicts, lists and tuples holding tensors and JSON values into
({path: tensor}, skeleton); `unflatten` rebuilds the identical tree. The skeleton tags every
container, so what JSON alone would lose survives: int vs str dict keys (a plain optimizer's
state is keyed by parameter index, FSDP's full state dict by parameter name), key order, and
tuples (AdamW's `betas`). Tensors keep their dtype, shape and values (safetensors).

Skeleton, as written to JSON:
    {"dict": [[key, node], ...]}   key an int or a str
    {"list": [node, ...]}, {"tuple": [node, ...]}
    {"tensor": "state/0/exp_avg"}  the tensor's key in the safetensors file: its path in the tree
    null, true, 1, 0.5, "text"     JSON values as they are
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from slimformer.errors import UserError

FORMAT = 1  # written to <stem>.json; bump when the skeleton changes
_SCALARS = (type(None), bool, int, float, str)


def flatten(tree: Any) -> tuple[dict[str, Tensor], Any]:
    """(tensors keyed by their "/"-joined path in `tree`, JSON-ready skeleton of everything else)."""
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, Tensor):
            key = "/".join(path)
            if not key or key in tensors:  # e.g. both the int key 0 and the str key "0" in one dict
                raise ValueError(f"cannot store a tensor at path {key!r}: the path is empty or not unique.")
            tensors[key] = node
            return {"tensor": key}
        if isinstance(node, dict):
            bad = [k for k in node if type(k) not in (int, str)]
            if bad:
                raise TypeError(f"dict keys must be int or str, found {bad[0]!r} at {'/'.join(path) or 'the root'}.")
            return {"dict": [[k, walk(v, (*path, str(k)))] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            kind = "tuple" if isinstance(node, tuple) else "list"
            return {kind: [walk(v, (*path, str(i))) for i, v in enumerate(node)]}
        if isinstance(node, _SCALARS):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} (at {'/'.join(path) or 'the root'}): "
                        "only tensors, dicts, lists, tuples, None, bool, int, float and str.")

    return tensors, walk(tree, ())


def unflatten(tensors: dict[str, Tensor], skeleton: Any) -> Any:
    """The tree that `flatten` split into (tensors, skeleton). ValueError on a malformed skeleton."""
    used: set[str] = set()

    def build(node: Any) -> Any:
        if isinstance(node, _SCALARS):
            return node
        if not (isinstance(node, dict) and len(node) == 1):
            raise ValueError(f"unexpected skeleton node {str(node)[:80]}.")
        (tag, body), = node.items()
        if tag == "tensor" and isinstance(body, str):
            if body not in tensors:
                raise ValueError(f"the skeleton names tensor {body!r}, which the tensor file lacks.")
            used.add(body)
            return tensors[body]
        if tag in ("list", "tuple") and isinstance(body, list):
            items = [build(v) for v in body]
            return tuple(items) if tag == "tuple" else items
        if tag == "dict" and isinstance(body, list):
            if not all(isinstance(p, list) and len(p) == 2 and type(p[0]) in (int, str) for p in body):
                raise ValueError(f"a dict entry is not an [int or str key, value] pair: {str(body)[:80]}.")
            return {k: build(v) for k, v in body}
        raise ValueError(f"unexpected skeleton node {str(node)[:80]}.")

    tree = build(skeleton)
    if used != tensors.keys():
        extra = sorted(tensors.keys() - used)
        raise ValueError(f"the tensor file holds {len(extra)} tensor(s) the skeleton does not name, e.g. {extra[0]!r}.")
    return tree


def save_state(tree: Any, folder: Path, stem: str) -> None:
    """Write `tree` as <folder>/<stem>.safetensors (its tensors, on the CPU) and <folder>/<stem>.json."""
    from safetensors.torch import save_file

    tensors, skeleton = flatten(tree)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(Path(folder) / f"{stem}.safetensors"))
    (Path(folder) / f"{stem}.json").write_text(json.dumps({"format": FORMAT, "skeleton": skeleton}))


def load_state(folder: Path, stem: str) -> Any:
    """Read back what `save_state` wrote (tensors on the CPU). UserError if the files are missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / f"{stem}.json").read_text())
        tensors = load_file(str(folder / f"{stem}.safetensors"))
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT and "skeleton" in meta):
            raise ValueError(f"expected {{'format': {FORMAT}, 'skeleton': ...}}, found {str(meta)[:80]}")
        return unflatten(tensors, meta["skeleton"])
    except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"checkpoint '{folder}': {stem}.safetensors / {stem}.json cannot be read ({str(exc)[:200]}); "
                        "the checkpoint is damaged: delete it or run without --resume.") from None
