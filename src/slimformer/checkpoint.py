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

from safetensors.torch import load_file, save_file
from torch import nn

from slimformer.errors import UserError

FINGERPRINT = "fingerprint.json"


def _stored_classes() -> dict[str, type[nn.Module]]:
    from slimformer.export.artifact import MODULE_CLASSES  # late: artifact imports the quant layers

    return MODULE_CLASSES


class BlockCheckpoint:
    """The finished blocks of one layer-wise step, in `folder/block_<i>.{safetensors,json}`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

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
        self.folder.mkdir(parents=True, exist_ok=True)
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
        meta.with_suffix(".tmp").write_text(json.dumps({"modules": modules, "info": info}))
        os.replace(meta.with_suffix(".tmp"), meta)

    def restore(self, blocks: list[nn.Module], upto: int) -> list[dict[str, Any]]:
        """Put saved blocks 0..upto-1 back in place; return their step infos."""
        classes = _stored_classes()
        infos = []
        for index in range(upto):
            weights, meta_path = self._paths(index)
            meta = json.loads(meta_path.read_text())
            block = blocks[index]
            for name, spec in meta["modules"].items():
                block.set_submodule(name, classes[spec["class"]].from_spec(spec))
            try:
                block.load_state_dict(load_file(str(weights)), strict=True)
            except RuntimeError as exc:
                raise UserError(f"checkpoint '{weights}' does not fit this model ({exc}); delete "
                                f"'{self.folder.parent}' or run without --resume.") from None
            infos.append(meta["info"])
        return infos


def fingerprint(**parts: Any) -> str:
    """A digest of everything that determines a run's result (model, recipe, calibration data)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_checkpoints(root: Path, digest: str, resume: bool) -> Path:
    """Prepare the checkpoint folder `root` for a run with fingerprint `digest`.

    Without `resume` any old checkpoint is discarded. With it, an existing one must have been
    made by the same model, recipe and calibration data.
    """
    stamp = root / FINGERPRINT
    if resume and stamp.exists():
        found = json.loads(stamp.read_text()).get("fingerprint")
        if found != digest:
            raise UserError(f"the checkpoint in '{root}' was made by another model, recipe or calibration "
                            f"data; delete it or run without --resume.")
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    stamp.write_text(json.dumps({"fingerprint": digest}))
    return root
