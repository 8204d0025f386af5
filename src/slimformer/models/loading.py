"""Load a model from a built-in alias, a local Hugging Face folder, or a compressed output folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimformer.errors import UserError
from slimformer.models.placement import resolve_dtype
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
    if not path.is_dir():
        raise UserError(f"model '{spec}' is a file; expected a Hugging Face model folder (config.json + "
                        f"*.safetensors), a slimformer output folder, or an alias ({', '.join(MODEL_ALIASES)}).")
    if not ((path / "config.json").exists() or (path / "manifest.json").exists()):
        raise UserError(f"model folder '{spec}' has no config.json: expected a Hugging Face model folder or a slimformer output folder.")
    return path


def load_bundle(spec: str | Path, *, tokenizer: bool = True, dtype: str | torch.dtype | None = "auto") -> ModelBundle:
    """Load an alias, a Hugging Face folder, or a slimformer artifact folder, in eval mode on the CPU.

    A Hugging Face folder loads in `dtype`: `auto` (default) is the checkpoint's own (its config's
    `dtype`), so a bf16 checkpoint takes half the memory of fp32; an artifact loads as it was saved.
    The folder is data, never code: custom code it names is refused, never imported. With
    tokenizer=False the folder needs no tokenizer files (the bundle's tokenizer is None).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_folder(spec)
    refuse_remote_code(folder)
    if (folder / "manifest.json").exists():
        from slimformer.artifact import load_artifact, verify_artifact

        manifest = verify_artifact(folder)  # checksums first: a damaged tokenizer file is reported as such
        tokenizer = _tokenizer(AutoTokenizer, folder) if tokenizer else None
        model, kind = load_artifact(folder, verified=manifest)
        return ModelBundle(model, tokenizer, kind, str(spec), folder)
    check_weights(folder)
    config = load_config(folder)  # before the tokenizer: a broken config.json is reported as such
    tokenizer = _tokenizer(AutoTokenizer, folder) if tokenizer else None
    kind = model_kind(config)
    loader = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        model, info = loader.from_pretrained(folder, config=config, dtype=resolve_dtype(dtype, config), local_files_only=True,
                                             trust_remote_code=False, use_safetensors=True, output_loading_info=True)
    except (ValueError, OSError, SafetensorError) as exc:
        raise UserError(f"model folder '{folder}': weights could not be loaded: {exc}") from None
    _refuse_invented(folder, info)
    read_into_memory(model, folder)
    model.eval()
    return ModelBundle(model, tokenizer, kind, str(spec), folder)


def read_into_memory(model: nn.Module, folder: Path) -> int:
    """Give every parameter stored in the folder's safetensors files its own memory, read with
    plain file reads, one tensor at a time; returns the bytes read.

    transformers leaves the weights memory-mapped from the files: resident pages of a mapping stay
    counted (and kept) while any tensor of that file lives, so a method that replaces layers one
    block at a time (GPTQ's codes) would hold the old weights' pages to the end. Once the weights
    are private copies, a replaced layer's memory is freed with it; the load itself never holds
    more than the model plus one tensor."""
    params = {name: p for name, p in model.named_parameters(remove_duplicate=True)}
    done = 0
    for path in sorted(folder.glob("*.safetensors")):
        header, start = _safetensors_header(path)
        with open(path, "rb", buffering=0) as f:
            for name, entry in header.items():
                p = params.get(name)
                stored = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
                if p is None or stored is None or tuple(entry["shape"]) != tuple(p.shape):
                    continue  # not a parameter under this name (a buffer, a renamed key): left as loaded
                begin, end = entry["data_offsets"]
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                f.readinto(memoryview(raw.numpy()))
                p.data = raw.view(stored).reshape(p.shape).to(p.dtype)
                done += end - begin
    return done


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset its data starts at."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def load_config(folder: Path) -> Any:
    """The folder's Hugging Face config, never from custom code (UserError if unreadable or unknown)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"model folder '{folder}': config.json could not be read: {exc}") from None


def refuse_remote_code(folder: Path) -> None:
    """UserError if the folder's config or tokenizer config asks for custom code (`auto_map`) that
    transformers has no built-in class for. Checked before transformers reads the folder, so no prompt
    to run it can appear. (A known `model_type` such as phi3 keeps an old `auto_map` harmlessly: with
    trust_remote_code=False transformers uses its own class.)"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = _json_file(folder / "config.json")
    if config is not None and "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING:
        raise UserError(_remote_code_message(folder / "config.json", config["auto_map"],
                                             f"model_type {str(config.get('model_type'))[:40]!r}"))
    tok = _json_file(folder / "tokenizer_config.json")
    if tok is not None and "auto_map" in tok:
        import transformers

        name = tok.get("tokenizer_class")
        if not (isinstance(name, str) and hasattr(transformers, name)):
            raise UserError(_remote_code_message(folder / "tokenizer_config.json", tok["auto_map"],
                                                 f"tokenizer_class {str(name)[:40]!r}"))


def _remote_code_message(path: Path, auto_map: Any, what: str) -> str:
    targets = ", ".join(sorted({str(v)[:60] for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])}))
    return (f"'{path}' asks for custom Python code ({what} is not built into transformers; auto_map -> {targets}). "
            "slimformer treats a model folder as data and never runs code from it: use a model whose "
            "architecture transformers supports natively.")


def _json_file(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc}); repair or replace the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' holds a JSON {type(data).__name__}, expected an object; repair or replace the file.")
    return data


def check_weights(folder: Path) -> None:
    """UserError, before anything is loaded, for weights slimformer must not or cannot read: no
    safetensors file (a pickled pytorch_model.bin is never loaded), a truncated or damaged one, or a
    slimformer artifact whose manifest is gone."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        extra = (f" (it has {', '.join(pickled[:3])}: pickle files, which slimformer never loads; convert them "
                 "to safetensors)") if pickled else ""
        raise UserError(f"model folder '{folder}' has no *.safetensors weights{extra}.")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise UserError(f"'{path}' is truncated or damaged ({exc}); replace it with a complete copy.") from None
        if meta.get("format") == "slimformer":
            raise UserError(f"'{folder}' is an incomplete slimformer artifact: '{path.name}' was written by "
                            "slimformer but manifest.json is missing, so its quantized layers cannot be rebuilt; "
                            "re-create the artifact.")


def _refuse_invented(folder: Path, info: dict[str, Any]) -> None:
    """UserError when weights would be made up (missing keys, freshly initialised) or dropped
    (unexpected keys). Tied weights are not reported missing by transformers."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
    raise UserError(f"model folder '{folder}': its weights do not match its config.json: {'; '.join(parts)}. "
                    "Missing weights would be initialised at random; slimformer refuses to compress or evaluate "
                    "such a model. Use a complete checkpoint whose config matches it.")


def _tokenizer(auto: Any, folder: Path) -> Any:
    try:
        return auto.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"model folder '{folder}': no usable tokenizer: {exc}") from None
