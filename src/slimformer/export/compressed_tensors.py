"""A Hugging Face folder in compressed-tensors format (what llm-compressor writes and vLLM and
`transformers` + compressed-tensors read), carrying our integer codes and fp16 scales unchanged.

- Weight-only `QuantLinear` (2-8 bits, symmetric or asymmetric, per channel or groups of N inputs):
  `pack-quantized`: `weight_packed` int32, `weight_scale`, `weight_shape`, and for asymmetric layers
  `weight_zero_point` int32 packed along the output dimension (math in `ct_packing`).
- W8A8 (`dynamic` per token, `static`): `int-quantized`: `weight` int8, `weight_scale`, and for static
  layers `input_scale` (+ `input_zero_point` when asymmetric).
Layers that differ in scheme get their own config group (format `mixed-precision` when the groups'
formats differ). Scales are written as float32: our fp16 scales convert exactly, so every
dequantized weight, scale * (q - zp) computed in float32, equals ours bit for bit. Readers that cast
them to the model dtype keep them exact in float16 (vLLM: --dtype float16), not in bfloat16.

Refused with a UserError, nothing written: lookup-table layers (NF4, log2, codebooks), AWQ/SmoothQuant
input scales, groups that do not divide a layer's width, per-tensor weight scales, W8A8 other than
8-bit weights/activations or with per-tensor dynamic activations, q/k/v (gate/up) of one block in
different schemes (vLLM fuses them into one matrix), a quantized lm_head tied to the embeddings, and
models whose config cannot describe them (as `hf.check_representable`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimformer.errors import UserError
from slimformer.layers import compressed_layers
from slimformer.outputs import atomic_folder
from slimformer.export.ct_packing import pack_int32, to_signed
from slimformer.export.hf import _skeleton, check_representable
from slimformer.models.layout import find_blocks
from slimformer.models.structure import describe_structure, sync_config

CT_VERSION = "0.19.0"  # the compressed-tensors release whose layout this writes (llm-compressor 0.14)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


@dataclass(frozen=True)
class Scheme:
    """One config group: weight args, and input-activation args for W8A8 (8-bit, symmetric or not)."""

    format: str  # "pack-quantized" | "int-quantized"
    bits: int
    group_size: int  # -1: per output channel; N > 0: groups of N inputs
    symmetric: bool
    act: str | None = None  # W8A8 input activations per "token" (dynamic) or "tensor" (static); None: weight-only
    act_symmetric: bool = True

    def quant_args(self) -> dict[str, Any]:
        """The config group's `weights` / `input_activations` (compressed-tensors QuantizationArgs)."""
        weights = _args(self.bits, self.symmetric, "channel" if self.group_size == -1 else "group",
                        None if self.group_size == -1 else self.group_size, False)
        inputs = None if self.act is None else _args(8, self.act_symmetric, self.act, None, self.act == "token")
        return {"weights": weights, "input_activations": inputs, "output_activations": None, "format": self.format}

    def describe(self) -> str:
        grid = "per channel" if self.group_size == -1 else f"g{self.group_size}"
        text = f"w{self.bits} {grid} {'sym' if self.symmetric else 'asym'}"
        if self.act:
            text += f", a8 per {self.act} {'dynamic' if self.act == 'token' else 'static'}"
        return text


def _args(bits: int, symmetric: bool, strategy: str, group_size: int | None, dynamic: bool) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": None,
            "zp_dtype": None if symmetric else "torch.int8", "observer": None, "observer_kwargs": {}}


def layer_scheme(name: str, layer: nn.Module) -> Scheme:
    """The config group `layer` belongs in; UserError (naming the layer and the fix) if none fits."""
    kind = type(layer).__name__
    if kind != "QuantLinear":
        what = "lookup-table codes (NF4/log2/codebook)" if kind == "LUTLinear" else "no integer codes yet"
        raise UserError(f"layer '{name}' is a {kind} ({what}); compressed-tensors stores integer grids "
                        "w = scale * (q - zero) only. Quantize it with rtn, gptq, dynamic or static (after qat, run "
                        "its convert step), leave it out with `ignore`, or export with --format hf or onnx.")
    if layer.input_scale is not None:
        raise UserError(f"layer '{name}' keeps a per-input-channel scale (AWQ or SmoothQuant: it computes "
                        "x / s against codes of W * s). The format has no such scale and a quantized weight cannot "
                        "absorb 1/s exactly; run `awq` with `fold: true` (the scale folded into the norm or linear before "
                        "it), quantize with rtn/gptq (weight-only) or static/dynamic (W8A8), or export with --format hf "
                        "or onnx.")
    if getattr(layer, "minimum", None) is not None:
        raise UserError(f"layer '{name}' has a float minimum per group (zero_point: float, llama.cpp's Q4_1 form: "
                        "w = scale * q + m); compressed-tensors stores integer zero points only. Requantize with "
                        "zero_point: int, or export this model with --format gguf.")
    bits, g, sym, in_f = layer.bits, layer.group_size, layer.symmetric, layer.in_features
    if g == 0:
        raise UserError(f"layer '{name}' has one weight scale for the whole tensor (group_size 0); the "
                        "pack-quantized readers need per-channel (-1) or grouped scales: requantize with group_size "
                        "-1 or a divisor of the layer width.")
    if g > 0 and in_f % g:
        divisor = next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if in_f % d == 0)
        raise UserError(f"layer '{name}' has {in_f} inputs, not a multiple of group_size {g} (its last group "
                        f"holds {in_f % g}); compressed-tensors and vLLM need equal groups. Requantize with a "
                        f"group_size dividing {in_f} (e.g. {divisor}) or -1, or leave the layer out with `ignore`.")
    if layer.dynamic or layer.act_bits:
        if layer.dynamic and layer.act_granularity != "token":
            raise UserError(f"layer '{name}' quantizes activations per tensor at run time; vLLM's int8 W8A8 runs "
                            "dynamic activations per token only: use `dynamic` with activations: token.")
        if not (bits == 8 and sym and g == -1 and (layer.dynamic or layer.act_bits == 8)):
            raise UserError(f"layer '{name}' is W{bits}A{layer.act_bits or 8} (group_size {g}, symmetric {sym}); the "
                            "int-quantized format's readers run 8-bit symmetric per-channel weights with 8-bit "
                            "activations: use w_bits 8 and a_bits 8.")
        if layer.dynamic:
            return Scheme("int-quantized", 8, -1, True, "token")
        return Scheme("int-quantized", 8, -1, True, "tensor", bool(layer.act_symmetric))
    return Scheme("pack-quantized", bits, g, sym)


def layer_tensors(layer: nn.Module, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The layer's tensors under their compressed-tensors names (bias excluded), scales float32."""
    out_f, in_f = layer.codes.shape
    if scheme.format == "int-quantized":
        # (out, in) int8 codes, (out, 1) per-channel scales
        tensors = {"weight": to_signed(layer.codes, 8, True), "weight_scale": layer.scale.float()}
        if scheme.act == "tensor":  # static: one calibrated scale (and zero) for the layer input, (1,)
            tensors["input_scale"] = layer.act_scale.float().reshape(1)
            if not scheme.act_symmetric:
                tensors["input_zero_point"] = to_signed(layer.act_zero, 8, False).reshape(1)
        return tensors
    bits = scheme.bits
    tensors = {
        "weight_packed": pack_int32(to_signed(layer.codes, bits, scheme.symmetric), bits, dim=1),  # (out, words)
        "weight_scale": layer.scale.float(),  # (out, n_groups)
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not scheme.symmetric:  # (ceil(out * bits / 32), n_groups)
        tensors["weight_zero_point"] = pack_int32(to_signed(layer.zero, bits, False), bits, dim=0)
    return tensors


def _role_patterns(names: list[str], pool: list[str], prefix: str | None) -> list[str]:
    """`names` as compressed-tensors targets: one regex per block role (e.g. every block's mlp.down_proj)
    when it selects exactly the pool's layers of that role that are in `names`, else the exact names."""
    chosen, out = set(names), []
    for name in names:
        m = re.fullmatch(rf"{re.escape(prefix)}\.\d+\.(.+)", name) if prefix else None
        if m is None:
            out.append(name)
            continue
        pattern = rf"re:^{re.escape(prefix)}\.\d+\.{re.escape(m.group(1))}$"
        same_role = [n for n in pool if re.match(pattern[3:], n)]
        if all(n in chosen for n in same_role):
            if pattern not in out:
                out.append(pattern)
        else:
            out.append(name)
    return out


def _check_fused(schemes: dict[str, Scheme | None]) -> None:
    """UserError when layers vLLM fuses into one matrix (q/k/v, gate/up) differ in scheme."""
    for name, scheme in schemes.items():
        parent, _, leaf = name.rpartition(".")
        for members in FUSED:
            if leaf != members[0]:
                continue
            siblings = [f"{parent}.{m}" if parent else m for m in members]
            if all(s in schemes for s in siblings) and len({schemes[s] for s in siblings}) > 1:
                shown = "; ".join(f"{m}: {schemes[s].describe() if schemes[s] else 'float'}"
                                  for m, s in zip(members, siblings))
                raise UserError(f"layers {'/'.join(members)} of '{parent}' differ ({shown}); vLLM fuses them into "
                                "one matrix, which holds one scheme. Quantize them alike (same bits, group_size, "
                                "symmetric, or all left float).")


def quantization_config(groups: dict[Scheme, list[str]], ignore: list[str], pool: list[str],
                        prefix: str | None) -> dict[str, Any]:
    """config.json's `quantization_config`, as compressed-tensors 0.19 writes it for llm-compressor."""
    single = len(groups) == 1
    config_groups = {
        f"group_{i}": {"targets": ["Linear"] if single else _role_patterns(names, pool, prefix), **scheme.quant_args()}
        for i, (scheme, names) in enumerate(groups.items())
    }
    formats = {scheme.format for scheme in groups}
    return {
        "config_groups": config_groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None, "ignore": _role_patterns(ignore, pool, prefix), "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": CT_VERSION,
    }


def _schemes(model: nn.Module) -> dict[str, Scheme]:
    """Quantized layer -> its scheme (UserError for the first layer that has none)."""
    schemes = {n: layer_scheme(n, m) for n, m in compressed_layers(model).items()}
    if not schemes:
        raise UserError("the model has no quantized layers; write a plain folder with --format hf instead.")
    return schemes


def _plain_copy(model: nn.Module, schemes: dict[str, Scheme]) -> nn.Module:
    """A copy of `model` whose quantized layers are nn.Linear on the meta device (shape, no memory) with
    their real bias: the architecture the config checks and save_pretrained need, without materialising
    float weights (the deep copy's memo hands it these replacements)."""
    skeleton = _skeleton(model)  # the classes transformers builds: GPT-2 keeps Conv1D, which the format lacks
    memo: dict[int, Any] = {}
    for name in schemes:
        layer, theirs = model.get_submodule(name), skeleton.get_submodule(name)
        if not isinstance(theirs, nn.Linear):
            raise UserError(f"layer '{name}' is a {type(theirs).__name__} in the Hugging Face model (GPT-2 style); "
                            "compressed-tensors quantizes nn.Linear layers only: export with --format hf or onnx.")
        plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().float().clone())
        memo[id(layer)] = plain
    return copy.deepcopy(model, memo).eval()


def _plan(model: nn.Module, dense: nn.Module, schemes: dict[str, Scheme]) -> list[str]:
    """The float nn.Linear layers (the `ignore` list), after the checks on fused and tied layers."""
    floats = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n not in schemes]
    _check_fused({**schemes, **dict.fromkeys(floats)})
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tied = getattr(text_config, "tie_word_embeddings", False)
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    if tied and head_name in schemes:
        raise UserError(f"'{head_name}' is quantized but the config ties it to the input embeddings, which would "
                        "replace it on loading; leave it out of the targets (or untie the embeddings first).")
    return floats


def save_compressed_tensors(model: nn.Module, tokenizer: Any, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write `model` as a compressed-tensors Hugging Face folder at `out` (temporary sibling, then renamed).

    Returns {path, format, quant_format, config_groups: [{name, format, scheme, layers}], layers_quantized,
    layers_float (names), scale_dtype, bytes, warnings}."""
    out = Path(out).expanduser()
    if out.exists() and not (overwrite and out.is_dir()):
        raise UserError(f"output '{out}' already exists; choose another folder or pass --overwrite.")
    if not out.parent.is_dir():
        raise UserError(f"output folder's parent '{out.parent}' does not exist.")
    schemes = _schemes(model)
    dense = _plain_copy(model, schemes)
    floats = _plan(model, dense, schemes)
    if describe_structure(dense) is not None:  # uniform pruned sizes into the config, as hf.save_hf_folder
        sync_config(dense)
    check_representable(dense)
    groups: dict[Scheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    try:
        prefix = find_blocks(model)[0]
    except UserError:
        prefix = None
    pool = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    state = dense.state_dict()
    for name, scheme in schemes.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v for k, v in layer_tensors(model.get_submodule(name), scheme).items()})
    dense.config.quantization_config = quantization_config(groups, floats, pool, prefix)
    _write(dense, state, tokenizer, out)
    return {
        "path": str(out), "format": "compressed-tensors", "quant_format": dense.config.quantization_config["format"],
        "config_groups": [{"name": f"group_{i}", "format": s.format, "scheme": s.describe(), "layers": len(names)}
                          for i, (s, names) in enumerate(groups.items())],
        "layers_quantized": len(schemes), "layers_float": floats, "scale_dtype": "float32",
        "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        "warnings": _warnings(list(groups), tokenizer),
    }


def _warnings(schemes: list[Scheme], tokenizer: Any) -> list[str]:
    """What a reader of the folder may compute differently from slimformer, or refuse."""
    warnings = []
    if any(s.act == "token" for s in schemes):
        warnings.append("per-token activations: transformers' compressed-tensors path scales each token by "
                        "absmax/127.5 over [-128, 127]; slimformer (and vLLM's int8 kernel) use absmax/127, so its "
                        "outputs differ slightly from slimformer's")
    odd = sorted({s.bits for s in schemes if not s.symmetric and s.bits not in (4, 8)})
    if odd:
        warnings.append(f"asymmetric {'/'.join(map(str, odd))}-bit layers: vLLM's pack-quantized scheme takes zero "
                        "points at 4 and 8 bits only (transformers reads them all)")
    if tokenizer is None:
        warnings.append("no tokenizer was available: the folder holds the model and config only")
    return warnings


def _write(dense: nn.Module, state: dict[str, torch.Tensor], tokenizer: Any, out: Path) -> None:
    """save_pretrained with our state dict (tied weights dropped, format metadata) into a temporary
    sibling, then swapped in place of `out`."""
    with atomic_folder(out) as tmp:  # readable by whoever serves it (the umask decides)
        dense.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
