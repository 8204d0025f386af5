"""The slimformer artifact: `model.safetensors` with encoded tensors + `manifest.json` + HF config.

Encodings, chosen per tensor, whichever is smallest:
- `dense`: stored as is.
- `bitmask`: a packed keep-mask (1 bit per weight) + the kept values, for sparse float weights.
- `packed`: integer codes (of a QuantLinear or another MODULE_CLASSES entry) stored `bits` bits
  each (two 4-bit codes per byte).
- `packed_bitmask`: for pruned-then-quantized layers, a keep-mask + the kept codes, packed (not for
  a QuantLinear with a float `minimum`, whose zeros have no code of their own: always `packed`).
A QuantLinear's `minimum` (llama.cpp's float minimum, fp16) is stored as a float tensor like its
`scale` (negative under signed_max), bit for bit. Format version 1 still: a slimformer older than
these rules refuses an artifact holding a `minimum` (an unexpected tensor) and reads a signed_max
one correctly (its dequantization is the symmetric codes * scale).
Loading reads only safetensors and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slimformer.errors import UserError
from slimformer.models.structure import apply_structure, describe_structure
from slimformer.quant.lut_linear import LUTLinear
from slimformer.quant.packing import pack_bitmask, pack_codes, unpack_bitmask, unpack_codes
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.qscheme import expand_groups

# Module classes the artifact stores by description + packed integer buffers. Each implements
# spec() -> dict, from_spec(dict) (classmethod) and packed_leaves() -> {leaf: (bits, offset)}.
MODULE_CLASSES: dict[str, type[nn.Module]] = {"QuantLinear": QuantLinear, "LUTLinear": LUTLinear}

FORMAT = "slimformer"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
CONFIG = "config.json"
MANIFEST_DIGEST = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this key
ALLOW_UNSEALED = "SLIMFORMER_ALLOW_UNSEALED"  # =1: load a manifest without its digest (older artifacts), with a warning


def save_artifact(
    model: nn.Module, folder: Path, *, kind: str, tokenizer: Any = None, extra: dict[str, Any] | None = None
) -> int:
    """Write the model into `folder` (which must exist); return the bytes written for weights+manifest."""
    folder = Path(folder)
    tensors, encodings, tied = _encode_state(model)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT})
    model.config.save_pretrained(folder)
    written = [WEIGHTS, CONFIG]
    if tokenizer is not None:
        written += [Path(f).name for f in tokenizer.save_pretrained(folder) if Path(f).parent == folder]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "architecture": type(model).__name__,
        "modules": {name: {"class": type(m).__name__, **m.spec()} for name, m in _stored_modules(model).items()},
        "tensors": encodings,
        "tied": tied,
        "structure": describe_structure(model),  # per-block heads/neurons: pruned models may be non-uniform
        # every file loading relies on; the manifest seals itself with MANIFEST_DIGEST
        "sha256": {name: _sha256(folder / name) for name in sorted(set(written)) if (folder / name).is_file()},
        **(extra or {}),
    }
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return sum((folder / f).stat().st_size for f in (WEIGHTS, MANIFEST, CONFIG))


def _stored_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if MODULE_CLASSES.get(type(m).__name__) is type(m)}


def _encode_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    stored = _stored_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    encodings: dict[str, Any] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        t = t.detach()
        ptr = (t.data_ptr(), tuple(t.shape), t.stride()) if t.numel() else None
        if ptr is not None and ptr in seen and seen[ptr] in encodings:
            tied[key] = seen[ptr]  # tied weights (e.g. lm_head = embeddings) are stored once
            continue
        if ptr is not None:
            seen[ptr] = key
        owner, _, leaf = key.rpartition(".")
        packed = stored[owner].packed_leaves() if owner in stored else {}
        if leaf in packed:
            encodings[key] = _put_packed(tensors, key, t, *packed[leaf], stored[owner])
        else:
            encodings[key] = _put_float(tensors, key, t)
    return tensors, encodings, tied


def _put_packed(tensors: dict, key: str, t: torch.Tensor, bits: int, offset: int, m: nn.Module) -> dict[str, Any]:
    meta = {"bits": bits, "offset": offset, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(m, QuantLinear) and key.endswith(".codes") and getattr(m, "minimum", None) is None:
        # a pruned weight's code is its group's zero point: when enough are pruned, a bitmask plus
        # the kept codes is smaller than every code. Not for a float minimum (zero_point "float"):
        # there 0 has no code of its own (a pruned weight becomes round(-m / d), w ~ d * code + m)
        keep = t != expand_groups(m.zero, m.in_features, m.group_size)
        nnz = int(keep.sum())
        if (t.numel() + 7) // 8 + (nnz * bits + 7) // 8 < (t.numel() * bits + 7) // 8:
            tensors[key + ".mask"] = pack_bitmask(keep)
            tensors[key + ".values"] = pack_codes(t[keep], bits, offset)
            return {"encoding": "packed_bitmask", "group_size": m.group_size, "nnz": nnz, **meta}
    tensors[key] = pack_codes(t, bits, offset)
    return {"encoding": "packed", **meta}


def _put_float(tensors: dict, key: str, t: torch.Tensor) -> dict[str, Any]:
    t = t.contiguous()
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.is_floating_point() and t.dim() >= 2:
        mask = t != 0
        nnz = int(mask.sum())
        sparse_bytes = (t.numel() + 7) // 8 + nnz * t.element_size()
        if sparse_bytes < t.numel() * t.element_size():
            tensors[key + ".mask"] = pack_bitmask(mask)
            tensors[key + ".values"] = t[mask]
            return {"encoding": "bitmask", **meta}
    tensors[key] = t
    return {"encoding": "dense", **meta}


def _decode(stored: dict[str, torch.Tensor], key: str, encodings: dict[str, Any]) -> torch.Tensor:
    enc = encodings[key]
    shape = tuple(enc["shape"])
    numel = math.prod(shape)
    if enc["encoding"] == "dense":
        return stored[key]
    if enc["encoding"] == "packed":
        return unpack_codes(stored[key], enc["bits"], enc["offset"], numel, shape)
    if enc["encoding"] == "packed_bitmask":
        zero_key = key.removesuffix(".codes") + ".zero"
        codes = expand_groups(_decode(stored, zero_key, encodings), shape[1], enc["group_size"]).expand(shape).clone()
        keep = unpack_bitmask(stored[key + ".mask"], numel, shape)
        codes[keep] = unpack_codes(stored[key + ".values"], enc["bits"], enc["offset"], enc["nnz"], (enc["nnz"],))
        return codes
    if enc["encoding"] == "bitmask":
        mask = unpack_bitmask(stored[key + ".mask"], numel, shape)
        values = stored[key + ".values"]
        out = torch.zeros(shape, dtype=values.dtype)
        out[mask] = values
        return out
    raise UserError(f"unknown tensor encoding '{enc['encoding']}' for '{key}'.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys), its own digest left out."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and check the manifest of an artifact folder: format, version, its own digest."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"'{path}' is unreadable or corrupted ({exc}): re-create the artifact.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"'{folder}' is not a slimformer artifact (manifest format {found!r}, expected {FORMAT!r}).")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(
            f"'{folder}' has artifact format version {version!r}, not a known one: this slimformer reads "
            f"integer versions 1 to {FORMAT_VERSION}. The manifest is damaged or was not written by slimformer."
        )
    if version > FORMAT_VERSION:
        raise UserError(
            f"'{folder}' was written in artifact format version {version}, newer than this slimformer "
            f"reads (up to {FORMAT_VERSION}); upgrade slimformer."
        )
    expected = manifest.get(MANIFEST_DIGEST)
    if expected is None:
        _unsealed(path)
    elif expected != manifest_digest(manifest):
        raise UserError(f"'{path}' is corrupted (its sha256 does not match the digest it records): re-create the artifact.")
    return manifest


def _unsealed(path: Path) -> None:
    """A manifest without its own digest: altered (the digest removed with it) or from a slimformer
    older than the seal. Refused unless the user opts in, and then with a warning."""
    if os.environ.get(ALLOW_UNSEALED) != "1":
        raise UserError(f"'{path}' records no {MANIFEST_DIGEST}, so it cannot be checked: it was edited, or written "
                        f"by a slimformer older than the seal. Re-create the artifact; to load an old one you trust, "
                        f"set {ALLOW_UNSEALED}=1.")
    warnings.warn(f"'{path}' has no {MANIFEST_DIGEST}: loaded unchecked because {ALLOW_UNSEALED}=1.", stacklevel=3)


def verify_artifact(folder: Path) -> dict[str, Any]:
    """Read the manifest and check every file it lists against its sha256; returns the manifest.

    A missing, truncated or altered file is a UserError telling the user to re-create the artifact."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    sums = manifest.get("sha256")
    if not isinstance(sums, dict) or WEIGHTS not in sums:
        raise UserError(f"'{folder}/{MANIFEST}' lists no sha256 for {WEIGHTS}: the manifest is damaged; re-create the artifact.")
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"'{path}' is missing: the artifact is incomplete; re-create it.")
        if _sha256(path) != expected:
            raise UserError(f"'{path}' is corrupted (sha256 mismatch: the file was truncated or altered); re-create the artifact.")
    return manifest


def load_artifact(folder: Path, *, verified: dict[str, Any] | None = None) -> tuple[nn.Module, str]:
    """Rebuild (model, kind) from an artifact folder, verifying its checksums; never unpickles.

    `verified`: the manifest `verify_artifact` already returned for this folder (skips hashing twice)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from slimformer.models.loading import load_config, refuse_remote_code

    folder = Path(folder)
    refuse_remote_code(folder)
    manifest = verified if verified is not None else verify_artifact(folder)
    weights = folder / WEIGHTS
    config = load_config(folder)  # never from custom code; an unknown model_type is a UserError
    loader = AutoModelForCausalLM if manifest["kind"] == "decoder" else AutoModel
    model = loader.from_config(config, dtype=torch.float32)
    if manifest.get("structure"):  # shrink to the pruned sizes before any weight is loaded
        apply_structure(model, manifest["structure"])
    for name, spec in manifest["modules"].items():
        if spec.get("class") not in MODULE_CLASSES:
            raise UserError(f"'{folder}': module '{name}' has class {spec.get('class')!r}, unknown to this slimformer; upgrade it.")
        model.set_submodule(name, MODULE_CLASSES[spec["class"]].from_spec(spec))
    try:
        stored = load_file(str(weights))
        state = {key: _decode(stored, key, manifest["tensors"]) for key in manifest["tensors"]}
    except (SafetensorError, KeyError, RuntimeError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"'{weights}' is corrupted or does not match its manifest ({type(exc).__name__}: {exc}); "
                        "re-create the artifact.") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    untied = set(missing) - set(manifest["tied"])
    if untied or unexpected:
        raise UserError(f"'{folder}': artifact does not match its config (missing {sorted(untied)[:3]}, unexpected {unexpected[:3]}).")
    for key, source in manifest["tied"].items():
        if key in missing:  # re-tie if from_config did not already share the tensor
            owner, _, leaf = key.rpartition(".")
            src_owner, _, src_leaf = source.rpartition(".")
            setattr(model.get_submodule(owner), leaf, getattr(model.get_submodule(src_owner), src_leaf))
    return model.eval(), manifest["kind"]
