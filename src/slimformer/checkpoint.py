"""Block checkpoints for `--resume`: a layer-wise step saves each finished block, and a resumed run
restores them and continues from the first block not saved.

Only the blocks are stored, not the activations between them: a resumed run recomputes block k's
inputs by running the restored blocks 0..k-1 on the calibration windows, which are the very same
operations on the very same tensors as in the interrupted run, so the result is identical.
Files are safetensors + JSON (never unpickled), each written to a temporary name and renamed, so an
interruption mid-write leaves the previous block as the last finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from slimformer.errors import UserError

FINGERPRINT = "fingerprint.json"


def _stored_classes() -> dict[str, type[nn.Module]]:
    from slimformer.artifact import MODULE_CLASSES  # late: artifact imports the quant layers

    return MODULE_CLASSES


class BlockCheckpoint:
    """The finished blocks of one layer-wise step, in `folder/block_<i>.{safetensors,json}`; each
    block's JSON carries the run's fingerprint, checked when it is restored."""

    def __init__(self, folder: Path, digest: str | None = None) -> None:
        self.folder = Path(folder)
        self.digest = digest

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.folder / f"block_{index}.safetensors", self.folder / f"block_{index}.json"

    def finished(self, n_blocks: int) -> int:
        """How many leading blocks have been saved (the block to resume from)."""
        for index in range(n_blocks):
            if not all(p.exists() for p in self._paths(index)):
                return index
        return n_blocks

    def save(self, index: int, block: nn.Module, info: dict[str, Any]) -> None:
        """Store block `index` as it is now (its replaced layers by class + spec) and its step info."""
        claim(self.folder, self.digest)
        classes = _stored_classes()
        modules = {
            name: {"class": type(m).__name__, **m.spec()}
            for name, m in block.named_modules()
            if name and classes.get(type(m).__name__) is type(m)
        }
        tensors = {k: v.detach().contiguous().clone() for k, v in block.state_dict().items()}
        weights, meta = self._paths(index)
        save_file(tensors, str(weights.with_suffix(".tmp")))
        os.replace(weights.with_suffix(".tmp"), weights)
        meta.with_suffix(".tmp").write_text(json.dumps({"fingerprint": self.digest, "modules": modules, "info": info}))
        os.replace(meta.with_suffix(".tmp"), meta)

    def restore(self, blocks: list[nn.Module], upto: int) -> list[dict[str, Any]]:
        """Put saved blocks 0..upto-1 back in place; return their step infos."""
        classes = _stored_classes()
        infos = []
        for index in range(upto):
            weights, meta_path = self._paths(index)
            meta = _block_meta(meta_path, self.digest)
            block = blocks[index]
            try:
                for name, spec in meta["modules"].items():
                    block.set_submodule(name, classes[spec["class"]].from_spec(spec))
                block.load_state_dict(load_file(str(weights)), strict=True)
            except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, SafetensorError) as exc:
                raise UserError(f"checkpoint '{weights}' is damaged or does not fit this model ({str(exc)[:200]}); "
                                f"delete '{self.folder.parent}' or run without --resume.") from None
            infos.append(meta["info"])
        return infos


def _block_meta(path: Path, digest: str | None) -> dict[str, Any]:
    """A block's JSON, checked: readable, complete, and written by the run with fingerprint `digest`."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint '{path}' is damaged ({exc}); delete '{path.parent.parent}' or run without "
                        "--resume.") from None
    if not isinstance(meta, dict) or not {"modules", "info"} <= set(meta):
        raise UserError(f"checkpoint '{path}' is damaged (incomplete); delete '{path.parent.parent}' or run "
                        "without --resume.")
    if digest is not None and meta.get("fingerprint") != digest:
        raise UserError(f"checkpoint '{path}' was written by another run (another model, recipe or calibration "
                        f"data); delete '{path.parent.parent}' or run without --resume.")
    return meta


def claim(step_folder: Path, digest: str | None) -> None:
    """Create a step's checkpoint folder, and the run's fingerprint beside it if it is the first:
    called just before something is saved, so steps that never checkpoint leave no folder."""
    step_folder = Path(step_folder)
    stamp = step_folder.parent / FINGERPRINT
    step_folder.mkdir(parents=True, exist_ok=True)
    if digest is not None and not stamp.exists():
        stamp.write_text(json.dumps({"fingerprint": digest}))


def holds_finished(root: Path) -> bool:
    """True if the checkpoint folder `root` holds a finished block or training checkpoint."""
    root = Path(root)
    return root.is_dir() and (any(root.glob("step*/block_*.json")) or any(root.glob("step*/step_*/state.json")))


def fingerprint(**parts: Any) -> str:
    """A digest of everything that determines a run's result (model, recipe, calibration data)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_checkpoints(root: Path, digest: str, resume: bool) -> Path:
    """Prepare the checkpoint folder `root` for a run with fingerprint `digest`, before any slow work.

    Without `resume` any old checkpoint is discarded; the folder is created only when a step first
    saves something (`claim`). With it, an existing one must have been made by the same model,
    recipe and calibration data, and every saved block must be readable.
    """
    stamp = root / FINGERPRINT
    if resume and root.is_dir():
        try:
            found = json.loads(stamp.read_text()).get("fingerprint") if stamp.exists() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            found = None
        if found != digest:
            raise UserError(f"the checkpoint in '{root}' was made by another model, recipe or calibration "
                            f"data (or is damaged); delete it or run without --resume.")
        check_blocks(root, digest)
        return root
    shutil.rmtree(root, ignore_errors=True)
    return root


def check_blocks(root: Path, digest: str) -> None:
    """UserError for a saved block that is damaged or from another run (JSON, fingerprint, safetensors header)."""
    for meta in sorted(root.glob("step*/block_*.json")):
        _block_meta(meta, digest)
        weights = meta.with_suffix(".safetensors")
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(f"checkpoint '{weights}' is damaged ({exc}); delete '{root}' or run without "
                            "--resume.") from None
