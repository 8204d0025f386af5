"""Load a model from a built-in alias, a local Hugging Face folder, or a compressed output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import UserError
from slimformer.models.zoo import MODEL_ALIASES, resolve_alias

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "albert", "deberta", "deberta-v2", "camembert"}


@dataclass
class ModelBundle:
    """A model with what is needed to run it: tokenizer, kind, and where it came from."""

    model: nn.Module
    tokenizer: Any
    kind: str  # "decoder" (causal LM) | "encoder" (hidden states)
    name: str
    folder: Path | None = None  # the folder it was read from, if any


def model_kind(config: Any) -> str:
    """`decoder` for causal LMs, `encoder` for BERT-like models, from a HF config."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    if getattr(config, "model_type", "") in ENCODER_TYPES:
        return "encoder"
    return "decoder" if getattr(config, "is_decoder", False) or not archs else "encoder"


def resolve_folder(spec: str | Path) -> Path:
    """Alias or path -> an existing local folder (UserError otherwise)."""
    spec = str(spec)
    if spec in MODEL_ALIASES:
        return resolve_alias(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"model '{spec}' is neither a built-in alias ({', '.join(MODEL_ALIASES)}) nor an existing folder."
        )
    if not path.is_dir() or not ((path / "config.json").exists() or (path / "manifest.json").exists()):
        raise UserError(f"model folder '{spec}' has no config.json: expected a Hugging Face model folder or a slimformer output folder.")
    return path


def load_bundle(spec: str | Path, *, tokenizer: bool = True) -> ModelBundle:
    """Load an alias, a Hugging Face folder, or a slimformer artifact folder, in fp32 eval mode.

    With tokenizer=False the folder needs no tokenizer files (the bundle's tokenizer is None).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_folder(spec)
    if (folder / "manifest.json").exists():
        from slimformer.export.artifact import load_artifact, verify_artifact

        manifest = verify_artifact(folder)  # checksums first: a damaged tokenizer file is reported as such
        tokenizer = _tokenizer(AutoTokenizer, folder) if tokenizer else None
        model, kind = load_artifact(folder, verified=manifest)
        return ModelBundle(model, tokenizer, kind, str(spec), folder)
    tokenizer = _tokenizer(AutoTokenizer, folder) if tokenizer else None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise UserError(f"model folder '{folder}': config.json could not be read: {exc}") from None
    kind = model_kind(config)
    loader = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        model = loader.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise UserError(f"model folder '{folder}': weights could not be loaded: {exc}") from None
    model.eval()
    return ModelBundle(model, tokenizer, kind, str(spec), folder)


def _tokenizer(auto: Any, folder: Path) -> Any:
    try:
        return auto.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise UserError(f"model folder '{folder}': no usable tokenizer: {exc}") from None

