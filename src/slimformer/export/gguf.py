"""GGUF export (llama.cpp's file format) of decoder LMs, carrying slimformer's own integer codes and
scales into GGML blocks unchanged.

Architectures (`gguf_arch` describes each): Llama/Mistral as GGUF arch `llama`, Qwen2 `qwen2`, Qwen3
`qwen3`, Gemma `gemma`, Gemma-2 `gemma2`, Gemma-3 text `gemma3`, Phi-3 `phi3`. Tensor names and layout
follow llama.cpp's converter (convert_hf_to_gguf.py): `token_embd`, `blk.N.attn_q/k/v/output` (phi3:
fused `attn_qkv`), `blk.N.ffn_gate/up/down` (phi3: fused gate|up `ffn_up`), the norms, `output_norm`,
`output` (omitted when the embedding is tied); for `llama` the rows of q/k are permuted per head into
ggml's rotary layout (`rope_row_order`), for QuantLinear by moving whole rows of codes, scales and
zeros, which is exact. Gemma's norms (x * (1 + w)) are written as w + 1 in F32; weights never change.

| layer | GGUF tensor |
|---|---|
| QuantLinear, 4-bit symmetric / asymmetric | Q4_0 / Q4_1 |
| QuantLinear, 5-bit symmetric / asymmetric | Q5_0 / Q5_1 |
| QuantLinear, 8-bit symmetric | Q8_0 |
| plain weights (embedding, nn.Linear) | F32, F16 or llama.cpp's RTN Q8_0 (`unquantized`) |
| norms, biases | F32 |

QuantLinear groups must be whole 32-weight blocks: group_size a multiple of 32, or per channel / per
tensor, over a width that is a multiple of 32 (a smaller last group is fine when it is whole blocks
too: 576 = 4 x 128 + 64). Symmetric codes are bit-exact, pruned weights included (code 0 is exactly
0); asymmetric ones lose only the fp16 rounding of each block's offset m = -scale * zero (|error| <=
ulp_fp16(m) / 2, see `gguf_blocks`), which is also what a pruned weight (code = zero point) reads
where scale * zero does not fit fp16. Anything else is refused with a UserError naming the layer, and
nothing is written: other bit widths, group sizes, lookup-table codes (NF4, log2, codebooks), AWQ
input scales (a per-input-channel 1/s cannot be folded into integer codes exactly), and activation
quantization (`dynamic`, `static`, `smoothquant`), which GGUF weights cannot carry. So are other
architectures, rope scalings other than linear and (Llama) llama3, an untied Gemma/Gemma-2 head, and
Gemma settings llama.cpp's graph does not compute (see `gguf_arch`).

Structurally pruned models: the head counts and FFN widths are read from each block's weights (a
per-block pruned model keeps the original sizes in its config). Blocks of one size are written as
usual at that size. Blocks of different sizes are written with per-layer arrays for
`{arch}.feed_forward_length` / `attention.head_count(_kv)` as GGUF arch `deci` for Llama/Mistral:
llama.cpp's loader reads such arrays for every arch, but only some graphs use them per layer
(models/deci.cpp: hparams.n_head(il), n_ff(il); models/llama.cpp, qwen2, qwen3, gemma*, phi3 size
every block by layer 0's), so other architectures are refused, as are blocks left without heads or
neurons.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quant_shape_from_byte_shape
from gguf.quants import quantize as ggml_quantize
from torch import nn

from slimformer.errors import UserError
from slimformer.export.gguf_arch import (ArchSpec, Dims, Rope, arch_spec, config_warnings, expected_shape,
                                         general_name, is_norm, model_dims, rope_plan, write_arch_metadata)
from slimformer.export.gguf_blocks import QK, block_type, blockable, offsets_fp16, pack_blocks, per_block, rope_row_order
from slimformer.export.gguf_vocab import vocab_metadata, write_vocab
from slimformer.layers import is_compressed
from slimformer.models.layout import find_blocks
from slimformer.outputs import atomic_file
from slimformer.quant.qlinear import QuantLinear

UNQUANTIZED = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}
FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "Q4_0": LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q5_0": LlamaFileType.MOSTLY_Q5_0,
              "Q5_1": LlamaFileType.MOSTLY_Q5_1, "Q8_0": LlamaFileType.MOSTLY_Q8_0}
_FP16_MAX = 65504.0

_RECIPE_FIX = ("quantize it with `rtn` or `gptq` at bits 4 or 5 (symmetric or not) or 8 (symmetric) with a "
               "group_size that is a multiple of 32 or -1, or leave it out with `ignore`")
_VARYING = ("heads", "kv_heads", "ffn")  # the sizes structured pruning changes per block


@dataclass(frozen=True)
class _Sizes:
    """The file-level sizes (layer 0's where blocks differ) and each block's own."""

    file: Dims
    blocks: tuple[Dims, ...]

    def varying(self) -> list[str]:
        return [k for k in _VARYING if len({getattr(b, k) for b in self.blocks}) > 1]

    def per_layer(self, key: str) -> int | list[int]:
        """One number, or one per block where the blocks differ (llama.cpp's get_key_or_arr)."""
        values = [int(getattr(b, key)) for b in self.blocks]
        return values if len(set(values)) > 1 else values[0]

    def of(self, base: str) -> Dims:
        """The sizes tensor `base` (blk.N.* or a model-wide one) must have."""
        return self.blocks[int(base.split(".")[1])] if base.startswith("blk.") else self.file


@dataclass
class _Tensor:
    """One GGUF tensor: its name, data (float, or uint8 blocks) and ggml type."""

    name: str
    data: np.ndarray
    kind: GGMLQuantizationType


def export_gguf(model: nn.Module, tokenizer: Any, path: Path, *, unquantized: str = "f32") -> dict[str, Any]:
    """Write `model` (a causal LM of a family in `gguf_arch.ARCHITECTURES`, compressed or not) and its tokenizer to `path`
    as GGUF. QuantLinear codes go into GGML blocks unchanged; plain float weights are written as
    `unquantized` ("f32", "f16", or "q8_0": llama.cpp's round-to-nearest Q8_0 for 2-D weights).

    Returns {path, bytes, seconds, tensors: {ggml type: count}, layers_from_codes, max_offset_rounding
    (largest |m - (-scale * zero)| of the Q4_1/Q5_1 blocks, 0.0 when none), warnings}. Anything the
    file cannot hold is a UserError and nothing is written (temporary sibling, then renamed)."""
    start = time.perf_counter()
    if unquantized not in UNQUANTIZED:
        raise UserError(f"unquantized must be one of {', '.join(UNQUANTIZED)}, got {unquantized!r}.")
    if tokenizer is None:
        raise UserError("GGUF export needs the model's tokenizer: a GGUF file carries its vocabulary.")
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise UserError(f"output folder '{path.parent}' does not exist.")
    if path.is_dir():
        raise UserError(f"output '{path}' is a folder; give a file name such as model.gguf.")
    spec = arch_spec(model)
    sizes = _sizes(model, spec, model_dims(model, spec))
    dims = sizes.file
    rope = rope_plan(model.config, spec, dims, type(model).__name__)
    warnings = config_warnings(model.config, spec)
    vocab = vocab_metadata(tokenizer, dims.vocab)
    tensors, stats = _tensors(model, spec, sizes, UNQUANTIZED[unquantized])
    if rope.freqs is not None:  # the converter yields its generated tensors before the model's
        tensors.insert(0, _Tensor("rope_freqs.weight", rope.freqs, GGMLQuantizationType.F32))
    name, renamed = general_name(model, vocab.tokens)
    warnings += vocab.warnings + stats["warnings"] + renamed
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, dims.arch)
        try:
            _write_metadata(writer, model, name, spec, sizes, rope, tensors)
            write_vocab(writer, vocab)
            for t in tensors:
                writer.add_tensor(t.name, t.data, raw_dtype=t.kind if t.data.dtype == np.uint8 else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()  # the file is complete (or abandoned) before it is renamed or removed
    return {"path": str(path), "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - start, 2),
            "tensors": dict(Counter(t.kind.name for t in tensors)), "layers_from_codes": stats["from_codes"],
            "max_offset_rounding": stats["max_offset_rounding"], "warnings": warnings}


def _matrix_shape(module: nn.Module) -> tuple[int, ...]:
    """(rows, columns) of a layer as torch stores its weight; codes and plain weights alike."""
    if is_compressed(module):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def _sizes(model: nn.Module, spec: ArchSpec, dims: Dims) -> _Sizes:
    """Each block's head counts and FFN width from its weights (the config may hold the unpruned ones);
    UserError for blocks llama.cpp cannot build: empty, or of different sizes where its graph takes one."""
    _, blocks = find_blocks(model)
    path = {leaf: p for p, leaf in spec.blocks.items()}
    per_block = []
    for i, block in enumerate(blocks):
        if spec.fused:  # phi3: q|k|v in one matrix; structured pruning does not resize it (models.structure)
            per_block.append(dims)
            continue
        q, k = (_matrix_shape(block.get_submodule(path[leaf]))[0] for leaf in ("attn_q", "attn_k"))
        ffn = _matrix_shape(block.get_submodule(path["ffn_down"]))[1]
        d = dims.head_dim
        if q % d or k % d:
            raise UserError(f"block {i}: q/k projections have {q}/{k} rows, not whole heads of head_dim {d}.")
        heads, kv = q // d, k // d
        if min(heads, kv, ffn) == 0:
            raise UserError(f"block {i} has {heads} attention heads, {kv} key/value heads and {ffn} FFN neurons "
                            f"left; llama.cpp's {dims.arch} computes attention and an FFN in every block. Keep at "
                            "least one of each (slimformer's `heads`/`neurons` do), or remove the block with `layers`.")
        if heads % kv:
            raise UserError(f"block {i}: {heads} query heads do not share {kv} key/value heads evenly.")
        per_block.append(replace(dims, heads=heads, kv_heads=kv, ffn=ffn))
    sizes = _Sizes(per_block[0], tuple(per_block))
    if sizes.varying():
        sizes = _per_layer(model, spec, sizes)
    if sizes.file != dims and spec.check is not None:  # the arch's own limits, on the sizes really written
        spec.check(model.config, sizes.file)
    return sizes


def _per_layer(model: nn.Module, spec: ArchSpec, sizes: _Sizes) -> _Sizes:
    """Blocks of different sizes under the arch whose graph reads them per layer; else UserError."""
    varying = sizes.varying()
    values = "; ".join(f"{k} per block {[getattr(b, k) for b in sizes.blocks]}" for k in varying)
    differ = [i for i, b in enumerate(sizes.blocks) if any(getattr(b, k) != getattr(sizes.file, k) for k in varying)]
    if spec.per_layer_arch is None:
        raise UserError(f"{type(model).__name__}'s blocks differ in size ({values}: blocks {differ} differ from "
                        f"block 0), but llama.cpp's {spec.arch} builds every block with layer 0's head counts and "
                        "FFN width (its loader reads per-layer arrays, its graph does not use them). Prune with the "
                        "same sizes in every block (`scope: layer`), or keep the slimformer folder / export with "
                        "`--format onnx`.")
    arch = spec.per_layer_arch
    return _Sizes(replace(sizes.file, arch=arch), tuple(replace(b, arch=arch) for b in sizes.blocks))


def _named_parts(model: nn.Module, spec: ArchSpec, dims: Dims) -> list[tuple[str, str, nn.Module]]:
    """(HF module name, GGUF base name, module) for every module holding tensors, in the model's order;
    UserError for one that has no GGUF name, or a block count the config does not state."""
    prefix, blocks = find_blocks(model)
    if len(blocks) != dims.layers:
        raise UserError(f"the model has {len(blocks)} blocks but its config says num_hidden_layers={dims.layers}; "
                        "sync the config (structural pruning) before exporting to GGUF.")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names: dict[int, str | None] = {id(embed): "token_embd"}
    if head is not None:  # a tied head shares the embedding's tensor: llama.cpp then reuses token_embd
        tied = head.weight is embed.weight
        if not tied and not spec.has_output:
            raise UserError(f"the output head is not tied to the embedding, but llama.cpp's {spec.arch} always "
                            "computes logits with token_embd; tie them (as the released models are) or export "
                            "with `--format hf`.")
        names[id(head)] = None if tied else "output"
    base = prefix.rpartition(".")[0]
    names[id(model.get_submodule(f"{base}.norm" if base else "norm"))] = "output_norm"
    for i, block in enumerate(blocks):
        for path, leaf in spec.blocks.items():
            names[id(block.get_submodule(path))] = f"blk.{i}.{leaf}"
    parts = []
    for name in dict.fromkeys(key.rpartition(".")[0] for key in model.state_dict()):  # modules with tensors
        module = model.get_submodule(name)
        if id(module) not in names:
            raise UserError(f"module '{name}' ({type(module).__name__}) has no place in GGUF's {dims.arch} layout.")
        if names[id(module)] is not None:
            parts.append((name, names[id(module)], module))
    return parts


def _tensors(
    model: nn.Module, spec: ArchSpec, sizes: _Sizes, unquantized: GGMLQuantizationType
) -> tuple[list[_Tensor], dict]:
    """Every GGUF tensor, in the model's order, with how many came from codes and the offset rounding."""
    out, stats = [], {"from_codes": 0, "max_offset_rounding": 0.0, "warnings": []}
    for name, base, module in _named_parts(model, spec, sizes.file):
        leaf, dims = base.rpartition(".")[2], sizes.of(base)
        coded = is_compressed(module)
        shape = _matrix_shape(module)
        want = expected_shape(leaf, dims, spec)
        if shape != want:
            raise UserError(f"'{name}' has shape {shape}, but llama.cpp's {dims.arch} builds {want} from its "
                            f"block's sizes (hidden {dims.hidden}, heads {dims.heads}/{dims.kv_heads} of "
                            f"{dims.head_dim}, FFN {dims.ffn}); keep the slimformer folder.")
        order = _rope_order(leaf, spec, dims)
        if coded:
            data, kind, offset_err = _quant_blocks(name, _check_quant(name, module), order)
            stats["from_codes"] += 1
            stats["max_offset_rounding"] = max(stats["max_offset_rounding"], offset_err)
        else:
            w = module.weight.detach().float()
            if is_norm(leaf) and spec.norm_shift:  # Gemma: x * (1 + w), in fp32 as HF computes it
                w = w + spec.norm_shift
            data, kind, note = _float_tensor(name, w if order is None else w[order], unquantized)
            stats["warnings"] += note
        out.append(_Tensor(f"{base}.weight", data, kind))
        bias = getattr(module, "bias", None)
        if bias is not None:
            b = bias.detach().float()
            out.append(_Tensor(f"{base}.bias", (b if order is None else b[order]).numpy(), GGMLQuantizationType.F32))
    return out, stats


def _rope_order(leaf: str, spec: ArchSpec, dims: Dims) -> torch.Tensor | None:
    """The q/k row permutation llama.cpp applies for arch `llama` (none for NeoX-rotary archs)."""
    if not spec.permute_qk or leaf not in ("attn_q", "attn_k"):
        return None
    heads = dims.heads if leaf == "attn_q" else dims.kv_heads
    return rope_row_order(heads * dims.head_dim, heads)


def _check_quant(name: str, layer: nn.Module) -> QuantLinear:
    """The QuantLinear if GGML blocks hold it exactly (up to Q4_1/Q5_1 offset rounding); else UserError."""
    if not isinstance(layer, QuantLinear):
        what = ("lookup-table codes: nf4, log2, codebook" if type(layer).__name__ == "LUTLinear"
                else "not integer codes with per-group scales")
        raise UserError(f"layer '{name}' is a {type(layer).__name__} ({what}), which no GGML block type holds "
                        f"unchanged; {_RECIPE_FIX}.")
    if layer.dynamic or layer.act_bits:
        how = "dynamic int8 activations" if layer.dynamic else f"static {layer.act_bits}-bit activations"
        raise UserError(f"layer '{name}' quantizes its activations ({how}), which a GGUF file cannot carry; "
                        "drop the `dynamic`/`static`/`smoothquant` step, or use weight-only quantization: "
                        f"{_RECIPE_FIX}.")
    if layer.input_scale is not None:
        raise UserError(f"layer '{name}' has an AWQ input scale (codes quantize W * s per input channel); 1/s cannot be "
                        "folded into integer codes exactly, so GGML blocks cannot hold it. Run `awq` with `fold: true` "
                        "(one scale per shared input, folded into the norm or linear before it), or use `rtn`/`gptq`.")
    if block_type(layer.bits, layer.symmetric) is None:
        sym = "symmetric" if layer.symmetric else "asymmetric"
        raise UserError(f"layer '{name}' holds {layer.bits}-bit {sym} codes; GGML blocks hold 4- or 5-bit codes "
                        f"(symmetric: Q4_0/Q5_0, asymmetric: Q4_1/Q5_1) and 8-bit symmetric ones (Q8_0); {_RECIPE_FIX}.")
    if not blockable(layer.in_features, layer.group_size):
        raise UserError(f"layer '{name}' has group_size {layer.group_size} over {layer.in_features} inputs; GGML "
                        f"blocks are {QK} weights with one scale each, so a group must be a multiple of {QK} (or -1 "
                        f"per channel) and the width a multiple of {QK}; {_RECIPE_FIX}.")
    return layer


def _quant_blocks(
    name: str, layer: QuantLinear, order: torch.Tensor | None
) -> tuple[np.ndarray, GGMLQuantizationType, float]:
    """The layer's codes as GGML blocks; (bytes (out, row bytes), type, max |offset rounding|)."""
    kind = block_type(layer.bits, layer.symmetric)
    codes, scale, zero = layer.codes, layer.scale, layer.zero
    minimum = layer.minimum  # zero_point "float" (Q4_1's own form): w = scale * code + minimum, m stored as is
    if order is not None and scale.shape[0] > 1:  # rows move with their own scales and zeros
        codes, scale, zero = codes[order], scale[order], zero[order]
        minimum = minimum[order] if minimum is not None else None
    elif order is not None:  # per tensor: one scale for every row
        codes = codes[order]
    d = per_block(scale, layer.in_features, layer.group_size)  # (out|1, in/32)
    z = per_block(zero, layer.in_features, layer.group_size)
    offset_err = 0.0
    if minimum is not None:
        m = per_block(minimum, layer.in_features, layer.group_size)
        return pack_blocks(codes, d, kind, minimum=m), GGMLQuantizationType[kind], 0.0
    if not layer.symmetric:
        m, err = offsets_fp16(d, z)
        if not bool(torch.isfinite(m).all()):
            raise UserError(f"layer '{name}': scale * zero_point exceeds the fp16 range of a GGML block offset; "
                            "use symmetric quantization for this layer.")
        offset_err = float(err.abs().max()) if err.numel() else 0.0
    return pack_blocks(codes, d, kind, None if layer.symmetric else z), GGMLQuantizationType[kind], offset_err


def _float_tensor(
    name: str, w: torch.Tensor, kind: GGMLQuantizationType
) -> tuple[np.ndarray, GGMLQuantizationType, list[str]]:
    """A plain float tensor: 1-D (norms) always F32; 2-D as `kind`. llama.cpp's converter falls back to
    F16 when a row is not whole Q8_0 blocks; so do we, and say so."""
    if not bool(torch.isfinite(w).all()):
        raise UserError(f"'{name}' contains NaN or Inf values; check the model checkpoint.")
    if w.dim() == 1 or kind == GGMLQuantizationType.F32:
        return w.numpy().astype(np.float32), GGMLQuantizationType.F32, []
    notes = []
    if kind == GGMLQuantizationType.Q8_0 and w.shape[-1] % QK == 0:
        return ggml_quantize(w.numpy().astype(np.float32), kind), kind, []
    if kind == GGMLQuantizationType.Q8_0:
        notes.append(f"'{name}' has rows of {w.shape[-1]} weights, not whole Q8_0 blocks: written as F16")
    if float(w.abs().max()) > _FP16_MAX:
        raise UserError(f"'{name}' has weights beyond the fp16 range ({float(w.abs().max()):.3g}); export with "
                        "unquantized='f32'.")
    return w.numpy().astype(np.float16), GGMLQuantizationType.F16, notes


def _write_metadata(
    writer: GGUFWriter, model: nn.Module, name: str, spec: ArchSpec, sizes: _Sizes, rope: Rope, tensors: list[_Tensor]
) -> None:
    """general.* and {arch}.* keys, as llama.cpp's converter writes them (per-layer arrays as its DeciModel)."""
    config, dims = model.config, sizes.file
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(dims.hidden)
    writer.add_block_count(dims.layers)
    writer.add_feed_forward_length(sizes.per_layer("ffn"))
    writer.add_head_count(sizes.per_layer("heads"))
    writer.add_head_count_kv(sizes.per_layer("kv_heads"))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    write_arch_metadata(writer, config, dims, spec, rope)
    writer.add_vocab_size(dims.vocab)
    writer.add_file_type(_file_type(tensors))
    writer.add_quantization_version(GGML_QUANT_VERSION)


def _file_type(tensors: list[_Tensor]) -> int:
    """general.file_type: the type holding the most weights among 2-D tensors (llama.cpp's 'mostly')."""
    weights: Counter[str] = Counter()
    for t in tensors:
        if t.data.ndim == 2:
            shape = quant_shape_from_byte_shape(t.data.shape, t.kind) if t.data.dtype == np.uint8 else t.data.shape
            weights[t.kind.name] += shape[0] * shape[1]
    return int(FILE_TYPES[weights.most_common(1)[0][0]]) if weights else int(LlamaFileType.ALL_F32)

