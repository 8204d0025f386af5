"""A plain Hugging Face folder (model.safetensors + config + tokenizer) that `transformers` loads
without slimformer: every slimformer layer becomes a dense `nn.Linear` (GPT-2: `Conv1D`) holding the
exact weight it computes with.

- Weight-only codes, codebooks, sparse weights: the dequantized weight, nothing lost.
- AWQ / SmoothQuant per-input-channel scales: folded into the weight (W / s), nothing lost.
- Dynamic or static activation quantization has no place in a plain model: it is dropped (the
  folder computes with float activations) and the summary says so, layer by layer.
- Structurally pruned models: the config is given the sizes of the blocks when all blocks share
  them (`models.structure.sync_config`); a model whose tensors a fresh `from_config` model cannot
  hold (sizes differing per block, BERT with fewer heads) is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import UserError
from slimformer.layers import compressed_layers
from slimformer.outputs import atomic_folder
from slimformer.export.onnx_ops import dense_linear
from slimformer.models.structure import describe_structure, sync_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dense_copy(model: nn.Module) -> tuple[nn.Module, dict[str, list[str]]]:
    """A copy of `model` with every slimformer layer as a dense float layer; (copy, notes) where notes
    lists the layers `dequantized`, those whose input scale was `folded` and those whose
    `activation_quantization_dropped`."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model).eval()
    skeleton = _skeleton(model)
    notes: dict[str, list[str]] = {"dequantized": [], "folded": [], "activation_quantization_dropped": []}
    layers = list(compressed_layers(model).items())
    for name, layer in layers:
        dense = dense_linear(layer)  # dequantized_weight() already divides by an input scale
        if isinstance(_get(skeleton, name), Conv1D):  # GPT-2 keeps (in, out) weights
            conv = Conv1D(dense.out_features, dense.in_features)
            conv.weight.data.copy_(dense.weight.data.t())
            conv.bias.data.copy_(dense.bias.data if dense.bias is not None else torch.zeros(dense.out_features))
            dense = conv
        model.set_submodule(name, dense)
        notes["dequantized"].append(name)
        if getattr(layer, "input_scale", None) is not None:
            notes["folded"].append(name)
        if getattr(layer, "dynamic", False) or getattr(layer, "act_bits", None):
            notes["activation_quantization_dropped"].append(name)
    return model, notes


def _skeleton(model: nn.Module) -> nn.Module:
    """The model `transformers` builds from this config (on the meta device: shapes, no memory)."""
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else AutoModel
    with torch.device("meta"):
        return loader.from_config(copy.deepcopy(model.config))


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_representable(model: nn.Module) -> None:
    """UserError unless a model built from `model.config` has exactly `model`'s tensors and shapes
    (what a plain `from_pretrained` needs): e.g. a structurally pruned model whose blocks differ."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in _skeleton(model).state_dict().items()}
    differ = [k for k in ours if k in theirs and ours[k] != theirs[k]]
    if differ:
        shown = "; ".join(f"{k}: {ours[k]} vs config's {theirs[k]}" for k in differ[:3])
        raise UserError(
            f"this model cannot be written as a plain Hugging Face folder: {len(differ)} tensors do not have "
            f"the shapes its config describes ({shown}). A Hugging Face config holds one head count and one "
            "intermediate size for all blocks, so a model pruned to different sizes per layer (non-uniform "
            "structure) is not representable; keep the slimformer folder, or export to ONNX "
            "(`slimformer export DIR --format onnx`), which keeps each layer's own shape."
        )
    extra, missing = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if extra or any(not k.endswith(("lm_head.weight", "position_ids")) for k in missing):
        raise UserError(
            f"this model cannot be written as a plain Hugging Face folder: tensors {extra[:3]} are not in "
            f"the architecture its config describes (missing there: {missing[:3]}); it holds layer types "
            "plain transformers cannot load."
        )


def save_hf_folder(
    model: nn.Module, tokenizer: Any, out: Path, *, dtype: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    """Write `model` as a plain Hugging Face folder at `out` (temporary sibling, then renamed).

    Returns {path, format, dtype, bytes, layers_dequantized, input_scales_folded,
    activation_quantization_dropped (layer names), warnings}."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    out = Path(out).expanduser()
    if out.exists() and not (overwrite and out.is_dir()):
        raise UserError(f"output '{out}' already exists; choose another folder or pass --overwrite.")
    if not out.parent.is_dir():
        raise UserError(f"output folder's parent '{out.parent}' does not exist.")
    dense, notes = dense_copy(model)
    if describe_structure(dense) is not None:  # Llama/BERT families: uniform pruned sizes into the config
        sync_config(dense)
    check_representable(dense)
    dense = dense.to(DTYPES[dtype])
    with atomic_folder(out) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    dropped = notes["activation_quantization_dropped"]
    warnings = [] if not dropped else [
        f"activation quantization dropped in {len(dropped)} layers (dynamic/static int8 activations have no "
        "plain Hugging Face form): the folder computes with float activations and the dequantized weights"]
    if tokenizer is None:
        warnings.append("no tokenizer was available: the folder holds the model and config only")
    return {
        "path": str(out), "format": "hf", "dtype": dtype,
        "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        "layers_dequantized": len(notes["dequantized"]), "input_scales_folded": len(notes["folded"]),
        "activation_quantization_dropped": dropped, "warnings": warnings,
    }
