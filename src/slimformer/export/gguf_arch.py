"""What GGUF export writes per decoder family: the Hugging Face class's GGUF architecture, tensor names,
norm transform, q/k row order, rotary embedding and the extra `{arch}.*` keys llama.cpp reads, each
the way llama.cpp's converter (convert_hf_to_gguf.py) writes it and llama.cpp's loader reads it.

| HF class | arch | what differs from `llama` |
|---|---|---|
| LlamaForCausalLM, MistralForCausalLM | llama | q/k rows permuted per head (ggml's adjacent rotary pairs) |
| Qwen2ForCausalLM | qwen2 | q/k/v biases, rows as they are (NeoX rotary) |
| Qwen3ForCausalLM | qwen3 | per-head `attn_q_norm`/`attn_k_norm`; head_dim may differ from hidden / heads |
| GemmaForCausalLM | gemma | norms written as 1 + w; gelu (tanh); output tied to token_embd |
| Gemma2ForCausalLM | gemma2 | + `post_attention_norm`/`post_ffw_norm`, logit softcaps, sliding window |
| Gemma3ForCausalLM | gemma3 | + q/k norms, sliding-window period, local rope base, optional untied output |
| Phi3ForCausalLM | phi3 | fused `attn_qkv` and `ffn_up` (= gate | up) as they are; partial rotary |

Rotary scaling: `linear` (rope.scaling.type/factor; for gemma3 the global layers only, as both HF
and llama.cpp apply it) and, for arch `llama`, `llama3` as a `rope_freqs` F32 tensor of per-frequency
divisors. Everything else (yarn, dynamic, Phi-3's longrope/su, ...) is a UserError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFWriter, RopeScalingType
from torch import nn

from slimformer.errors import UserError

_ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output"}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# Gemma 2/3 wrap both sublayers in norms: HF's post_attention_layernorm is llama.cpp's post_attention_norm
_SANDWICH = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_PHI3 = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", **_NORMS}


@dataclass(frozen=True)
class Dims:
    """The sizes every tensor must have (GGUF holds one head count, one FFN width per model)."""

    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rot: int  # rotary dimensions per head (Phi-3's partial rotary: fewer than head_dim)


@dataclass(frozen=True)
class Rope:
    """The rotary embedding as llama.cpp reads it."""

    theta: float
    scaling: str = "none"  # "none", "linear" or "llama3"
    factor: float = 1.0
    theta_swa: float | None = None  # gemma3's local (sliding) layers
    freqs: np.ndarray | None = None  # llama3: per-frequency divisors, the `rope_freqs` tensor


@dataclass(frozen=True)
class ArchSpec:
    """One decoder family: its GGUF architecture and how its tensors and keys are written."""

    arch: str
    blocks: dict[str, str]  # module path inside a block -> GGUF leaf name
    act_attr: str = "hidden_act"
    activation: str = "silu"
    permute_qk: bool = False  # llama: q/k rows into ggml's rotary layout
    norm_shift: float = 0.0  # Gemma computes x * (1 + w): llama.cpp's converter writes w + 1
    has_output: bool = True  # False: llama.cpp always reads token_embd as the output (gemma, gemma2)
    fused: bool = False  # phi3: attn_qkv = q|k|v rows, ffn_up = gate|up rows
    head_dim_keys: bool = False  # key_length/value_length written even when head_dim = hidden / heads
    llama3_rope: bool = False  # llama.cpp's loader reads `rope_freqs`
    carries_swa: bool = False  # llama.cpp runs the sliding window from the file
    # llama.cpp arch whose loader and graph take per-layer head counts / FFN widths for these blocks
    # (llama: `deci`, models/deci.cpp: hparams.n_head(il), n_ff(il)); None: one size per model
    per_layer_arch: str | None = None
    check: Callable[[Any, Dims], None] | None = field(default=None, compare=False)  # refuses what llama.cpp can't run
    extra: Callable[[GGUFWriter, Any, Dims], None] | None = field(default=None, compare=False)  # {arch}.* keys


def _sliding_window(writer: GGUFWriter, config: Any, dims: Dims) -> None:
    writer.add_sliding_window(int(config.sliding_window))


def _gemma2_check(config: Any, dims: Dims) -> None:
    """llama.cpp's gemma2 fixes the pattern (even layers slide), the q scale, and always softcaps."""
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not getattr(config, name, None):  # llama.cpp then softcaps at its defaults, 50 / 30
            raise UserError(f"Gemma2 with {name}=None: llama.cpp's gemma2 always applies it; export refused.")
    _check_query_scale(config, dims, layers_27b=46)
    _check_period(config, dims, 2)


def _gemma2_keys(writer: GGUFWriter, config: Any, dims: Dims) -> None:
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    _sliding_window(writer, config, dims)


def _gemma3_period(config: Any, dims: Dims) -> int:
    """The sliding-window period of HF's layer_types (llama.cpp: layer i slides iff i % period < period - 1)."""
    full = [i for i, t in enumerate(getattr(config, "layer_types", None) or []) if t == "full_attention"]
    return full[0] + 1 if full else max(6, dims.layers + 1)


def _gemma3_check(config: Any, dims: Dims) -> None:
    if not getattr(config, "sliding_window", None):
        raise UserError("Gemma3 without a sliding_window: llama.cpp's gemma3 then gives every layer the global "
                        "rope while HF keeps the local one on sliding layers; export refused.")
    if getattr(config, "attn_logit_softcapping", None):
        raise UserError("Gemma3 with attn_logit_softcapping: llama.cpp's gemma3 has no attention softcap.")
    _check_query_scale(config, dims, layers_27b=62)
    _check_period(config, dims, _gemma3_period(config, dims))


def _gemma3_keys(writer: GGUFWriter, config: Any, dims: Dims) -> None:
    _sliding_window(writer, config, dims)
    writer.add_sliding_window_pattern(_gemma3_period(config, dims))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _phi3_keys(writer: GGUFWriter, config: Any, dims: Dims) -> None:
    original = getattr(config, "original_max_position_embeddings", None)
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))  # 0 tells Phi-4 from Phi-3


def _check_query_scale(config: Any, dims: Dims, layers_27b: int) -> None:
    """llama.cpp scales q by 1/sqrt(head_dim) (27B: hidden / heads), not by query_pre_attn_scalar."""
    theirs = dims.hidden // dims.heads if dims.layers == layers_27b else dims.head_dim
    ours = getattr(config, "query_pre_attn_scalar", None) or dims.head_dim
    if ours != theirs:
        raise UserError(f"query_pre_attn_scalar={ours}, but llama.cpp's {dims.arch} scales queries by "
                        f"1/sqrt({theirs}) for a {dims.layers}-layer model; export refused.")


def _check_period(config: Any, dims: Dims, period: int) -> None:
    types = list(getattr(config, "layer_types", None) or [])
    want = ["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(dims.layers)]
    if types and types != want:
        raise UserError(f"layer_types {types} is not llama.cpp's {dims.arch} pattern (every {period}th layer "
                        "global); export refused.")


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", {**_ATTN, **_MLP, **_NORMS}, permute_qk=True, llama3_rope=True,
                                 per_layer_arch="deci"),
    "MistralForCausalLM": ArchSpec("llama", {**_ATTN, **_MLP, **_NORMS}, permute_qk=True, llama3_rope=True,
                                   per_layer_arch="deci"),
    "Qwen2ForCausalLM": ArchSpec("qwen2", {**_ATTN, **_MLP, **_NORMS}),
    "Qwen3ForCausalLM": ArchSpec("qwen3", {**_ATTN, **_QK_NORM, **_MLP, **_NORMS}, head_dim_keys=True),
    "GemmaForCausalLM": ArchSpec("gemma", {**_ATTN, **_MLP, **_NORMS}, activation="gelu_pytorch_tanh",
                                 norm_shift=1.0, has_output=False, head_dim_keys=True),
    "Gemma2ForCausalLM": ArchSpec("gemma2", {**_ATTN, **_MLP, **_SANDWICH}, act_attr="hidden_activation",
                                  activation="gelu_pytorch_tanh", norm_shift=1.0, has_output=False,
                                  head_dim_keys=True, carries_swa=True, check=_gemma2_check, extra=_gemma2_keys),
    "Gemma3ForCausalLM": ArchSpec("gemma3", {**_ATTN, **_QK_NORM, **_MLP, **_SANDWICH}, act_attr="hidden_activation",
                                  activation="gelu_pytorch_tanh", norm_shift=1.0, head_dim_keys=True,
                                  carries_swa=True, check=_gemma3_check, extra=_gemma3_keys),
    "Phi3ForCausalLM": ArchSpec("phi3", _PHI3, fused=True, extra=_phi3_keys),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The model's ArchSpec; UserError for a class GGUF export does not write."""
    name = type(model).__name__
    if name not in ARCHITECTURES or getattr(model, "config", None) is None:
        raise UserError(f"GGUF export writes {', '.join(ARCHITECTURES)}; this model is {name}. Export it with "
                        "`--format hf` or `--format onnx` instead.")
    return ARCHITECTURES[name]


def model_dims(model: nn.Module, spec: ArchSpec) -> Dims:
    """The sizes from the config; UserError for an activation or setting llama.cpp's graph does not compute."""
    config, name = model.config, type(model).__name__
    act = getattr(config, spec.act_attr, None) or getattr(config, "hidden_act", None)
    if act != spec.activation:
        raise UserError(f"{name} uses activation {act!r}; llama.cpp's {spec.arch} computes {spec.activation}.")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    partial = float(_rope_params(config).get("partial_rotary_factor", None)
                    or getattr(config, "partial_rotary_factor", None) or 1.0)
    dims = Dims(spec.arch, int(config.num_hidden_layers), int(config.hidden_size), heads,
                int(getattr(config, "num_key_value_heads", None) or heads), head_dim, int(config.intermediate_size),
                int(model.get_input_embeddings().weight.shape[0]), int(head_dim * partial))
    if spec.check is not None:
        spec.check(config, dims)
    return dims


def expected_shape(leaf: str, dims: Dims, spec: ArchSpec) -> tuple[int, ...]:
    """The shape llama.cpp's loader creates for `leaf` (weight rows first, as torch stores them)."""
    q, kv, h = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim, dims.hidden
    shapes = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_qkv": (q + 2 * kv, h),
              "attn_output": (h, q), "ffn_gate": (dims.ffn, h), "ffn_down": (h, dims.ffn),
              "ffn_up": ((2 if spec.fused else 1) * dims.ffn, h), "attn_q_norm": (dims.head_dim,),
              "attn_k_norm": (dims.head_dim,), "token_embd": (dims.vocab, h), "output": (dims.vocab, h)}
    return shapes.get(leaf, (h,))  # every other leaf is a hidden-size norm


def is_norm(leaf: str) -> bool:
    """Leaves that are RMSNorm weights (Gemma's 1 + w applies to exactly these)."""
    return leaf.endswith("norm")


def _rope_params(config: Any) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _kind(params: dict) -> str:
    return str(params.get("rope_type", params.get("type", "default")) or "default").lower()


def rope_plan(config: Any, spec: ArchSpec, dims: Dims, name: str) -> Rope:
    """The rotary embedding llama.cpp must compute; UserError for a scaling the file cannot carry."""
    params = _rope_params(config)
    full, local = params.get("full_attention", params), params.get("sliding_attention")
    theta = float(full.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    theta_swa = None
    if local is not None:  # gemma3: HF's sliding layers keep their own, unscaled rope; so does llama.cpp
        if _kind(local) != "default":
            raise UserError(f"{name}'s sliding layers use rope scaling {_kind(local)!r}; llama.cpp scales only the "
                            "global layers of gemma3. Export refused.")
        theta_swa = float(local.get("rope_theta", 10000.0))
    kind = _kind(full)
    if kind == "default":
        return Rope(theta, theta_swa=theta_swa)
    if kind == "linear":
        return Rope(theta, "linear", float(full["factor"]), theta_swa=theta_swa)
    if kind == "llama3" and spec.llama3_rope:
        return Rope(theta, "llama3", theta_swa=theta_swa, freqs=llama3_factors(full, config, dims, theta))
    if kind in ("longrope", "su"):
        raise UserError(f"{name} uses LongRoPE ({kind!r}) rope scaling, whose long/short factor tensors GGUF "
                        "export does not write; export the short-context model (rope_type 'default') or use "
                        "`--format hf`.")
    raise UserError(f"{name} uses rope scaling {kind!r}; GGUF export writes rope_type 'default', 'linear' and "
                    f"(for Llama) 'llama3' only; export refused.")


def llama3_factors(params: dict, config: Any, dims: Dims, theta: float) -> np.ndarray:
    """Llama 3.1's frequency divisors, as llama.cpp's converter computes `rope_freqs`: 1 for short
    wavelengths, `factor` for long ones, and a smooth blend between (HF's _compute_llama3_parameters)."""
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old = float(params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None) or 8192)
    freqs = 1.0 / (theta ** (np.arange(0, dims.rot, 2, dtype=np.float32) / np.float32(dims.rot)))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    smooth = (old / wavelen - low) / (high - low)
    out = np.where(wavelen < old / high, 1.0,
                   np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def write_arch_metadata(writer: GGUFWriter, config: Any, dims: Dims, spec: ArchSpec, rope: Rope) -> None:
    """The rotary keys, head sizes and the architecture's own keys (softcaps, windows)."""
    writer.add_rope_freq_base(rope.theta)
    writer.add_rope_dimension_count(dims.rot)
    if rope.theta_swa is not None:
        writer.add_rope_freq_base_swa(rope.theta_swa)
    if rope.scaling == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    if spec.head_dim_keys or dims.head_dim != dims.hidden // dims.heads:  # llama.cpp assumes hidden / heads
        writer.add_key_length(dims.head_dim)
        writer.add_value_length(dims.head_dim)
    if spec.extra is not None:
        spec.extra(writer, config, dims)


def config_warnings(config: Any, spec: ArchSpec) -> list[str]:
    """What the file does not carry but llama.cpp runs without (a sliding window its graph ignores)."""
    window = getattr(config, "sliding_window", None)
    used = getattr(config, "use_sliding_window", True)
    if not spec.carries_swa and window and used and window < getattr(config, "max_position_embeddings", 0):
        return [f"sliding_window {window} is not applied by llama.cpp's {spec.arch} (it attends to the whole "
                f"context): outputs differ past {window} tokens"]
    return []


# llama.cpp's vocab loader gives Phi-3's special tokens their attributes when general.name contains
# "phi3"/"phi-3", looking these up by text: a vocabulary without one of them makes the file unloadable
_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def general_name(model: nn.Module, tokens: list[str]) -> tuple[str, list[str]]:
    """general.name (the checkpoint folder's name, else the class) and a warning when it had to change."""
    config = model.config
    name = str(getattr(config, "_name_or_path", "") or type(model).__name__).rstrip("/").rpartition("/")[2]
    lowered = name.lower()
    if ("phi3" in lowered or "phi-3" in lowered) and not set(_PHI3_NAMED_TOKENS) <= set(tokens):
        safe = re.sub(r"(?i)phi-?3", "phi", name)
        return safe, [f"general.name {name!r} written as {safe!r}: llama.cpp keys Phi-3 token attributes on that "
                      f"name and fails to load a vocabulary without {', '.join(_PHI3_NAMED_TOKENS)}"]
    return name, []
