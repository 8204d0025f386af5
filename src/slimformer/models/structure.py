"""Attention heads, FFN neurons and blocks of each supported family, and functions that really
remove them (smaller `nn.Linear` modules, the attention's run-time attributes kept consistent).

The one place that knows which sub-modules hold heads and neurons:
- Llama / Qwen / Mistral style: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` (grouped-query
  attention: `num_key_value_groups` query heads share one key/value head).
- BERT style: `attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense`,
  `output.dense`.
Other families (GPT-2's fused `c_attn`, OPT, ...) are refused with a UserError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.errors import UserError
from slimformer.models.layout import find_blocks

# family -> sub-module paths inside one block (mlp_in: layers whose output rows are FFN neurons)
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"attn": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_out": "mlp.down_proj"},
    "bert": {"attn": "attention.self", "q": "attention.self.query", "k": "attention.self.key",
             "v": "attention.self.value", "o": "attention.output.dense", "mlp_in": ("intermediate.dense",),
             "mlp_out": "output.dense"},
}


@dataclass(frozen=True)
class BlockParts:
    """Where one block keeps its heads and neurons, as paths relative to the block."""

    index: int
    block: nn.Module
    family: str

    def path(self, role: str) -> str:
        return _FAMILIES[self.family][role]

    def get(self, role: str) -> nn.Module:
        return self.block.get_submodule(self.path(role))

    @property
    def attention(self) -> nn.Module:
        return self.get("attn")

    @property
    def head_dim(self) -> int:
        attn = self.attention
        return int(getattr(attn, "head_dim", None) or attn.attention_head_size)

    @property
    def heads(self) -> int:
        return self.get("q").out_features // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.get("k").out_features // self.head_dim

    @property
    def mlp_in(self) -> list[nn.Module]:
        return [self.block.get_submodule(p) for p in self.mlp_in_paths]

    @property
    def mlp_in_paths(self) -> tuple[str, ...]:
        return tuple(p for p in _FAMILIES[self.family]["mlp_in"] if _has(self.block, p))

    @property
    def intermediate(self) -> int:
        return self.get("mlp_out").in_features

    def sizes(self) -> dict[str, int]:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "intermediate": self.intermediate}


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _family(block: nn.Module) -> str | None:
    for family, paths in _FAMILIES.items():
        if all(_has(block, paths[r]) for r in ("q", "k", "v", "o", "mlp_out")):
            return family
    return None


def block_parts(model: nn.Module, method: str = "structured pruning") -> list[BlockParts]:
    """Heads/neurons layout of every block; UserError for families this module does not know."""
    _, blocks = find_blocks(model)
    family = _family(blocks[0])
    if family is None:
        names = ", ".join(n for n, _ in list(blocks[0].named_children())[:6])
        raise UserError(
            f"{method}: {type(model).__name__} is not supported: expected Llama/Qwen-style blocks "
            "(self_attn.q_proj/k_proj/v_proj/o_proj, mlp.down_proj) or BERT-style blocks "
            f"(attention.self.query/key/value, intermediate.dense, output.dense); its blocks hold {names}. "
            "GPT-2's fused c_attn is not supported."
        )
    parts = [BlockParts(i, b, family) for i, b in enumerate(blocks)]
    for p in parts:
        for role in ("q", "k", "v", "o", "mlp_out"):
            if type(p.get(role)) is not nn.Linear:
                raise UserError(
                    f"{method}: block {p.index} {p.path(role)} is a {type(p.get(role)).__name__}, not a plain "
                    "nn.Linear: run structured pruning before quantization."
                )
    return parts


def slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new, smaller nn.Linear keeping output rows (`dim=0`) or input columns (`dim=1`) `keep`."""
    keep = keep.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, keep)
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[keep] if dim == 0 else linear.bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    new.train(linear.training)
    return new


def _replace(parts: BlockParts, role_path: str, new: nn.Module) -> None:
    parts.block.set_submodule(role_path, new)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads: (heads,) -> (heads * head_dim,)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def resize_attention(parts: BlockParts, q_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
    """Keep query heads `q_heads` and key/value heads `kv_heads` (sorted indices) of one block.

    The caller guarantees a valid grouping (every kept key/value head serves the same number of
    kept query heads, in order); `keep_heads` checks that for pruning.
    """
    d = parts.head_dim
    q_rows, kv_rows = _head_rows(q_heads, d), _head_rows(kv_heads, d)
    for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
        _replace(parts, parts.path(role), slice_linear(parts.get(role), rows, 0))
    _replace(parts, parts.path("o"), slice_linear(parts.get("o"), q_rows, 1))
    attn, n_q, n_kv = parts.attention, len(q_heads), len(kv_heads)
    if parts.family == "llama":
        attn.num_key_value_groups = n_q // n_kv  # read by repeat_kv / SDPA at run time
        for name, value in (("num_heads", n_q), ("num_key_value_heads", n_kv)):
            if hasattr(attn, name):  # older / other Llama-like modules keep these too
                setattr(attn, name, value)
    else:
        attn.num_attention_heads = n_q
        attn.all_head_size = n_q * d


def keep_heads(parts: BlockParts, q_heads: Sequence[int]) -> None:
    """Keep query heads `q_heads` of a block; key/value heads none of them uses are removed.

    With grouped-query attention every remaining key/value group must keep the same number of
    query heads (otherwise repeat_kv would pair heads wrongly): UserError if not.
    """
    q = torch.as_tensor(sorted(set(int(h) for h in q_heads)), dtype=torch.long)
    n_q, n_kv = parts.heads, parts.kv_heads
    if len(q) == 0 or int(q.max()) >= n_q or int(q.min()) < 0:
        raise UserError(f"block {parts.index}: cannot keep heads {q.tolist()} of {n_q} (at least one, all in range).")
    group = q // (n_q // n_kv)  # (kept,) key/value head of each kept query head
    kv, counts = torch.unique(group, return_counts=True)
    if len(set(counts.tolist())) != 1:
        raise UserError(
            f"block {parts.index}: kept query heads {q.tolist()} leave key/value groups of unequal sizes "
            f"{counts.tolist()}; grouped-query attention needs the same number of query heads per group."
        )
    resize_attention(parts, q, kv)


def keep_neurons(parts: BlockParts, neurons: Sequence[int] | torch.Tensor) -> None:
    """Keep FFN intermediate neurons `neurons`: rows of the input projections, columns of the output."""
    keep = torch.as_tensor(sorted(set(int(i) for i in neurons)), dtype=torch.long)
    if len(keep) == 0 or int(keep.max()) >= parts.intermediate:
        raise UserError(f"block {parts.index}: cannot keep neurons out of {parts.intermediate} (at least one, all in range).")
    for path in parts.mlp_in_paths:
        _replace(parts, path, slice_linear(parts.block.get_submodule(path), keep, 0))
    _replace(parts, parts.path("mlp_out"), slice_linear(parts.get("mlp_out"), keep, 1))


def keep_blocks(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only blocks `keep` (in order), renumbering their `layer_idx` (KV-cache slots) and the config."""
    prefix, blocks = find_blocks(model)
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[-1] >= len(blocks) or keep[0] < 0:
        raise UserError(f"cannot keep blocks {keep} of {len(blocks)} (at least one, all in range).")
    model.set_submodule(prefix, nn.ModuleList([blocks[i] for i in keep]))
    for new_index, block in enumerate(model.get_submodule(prefix)):
        for m in block.modules():
            if getattr(m, "layer_idx", None) is not None:
                m.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(blocks):
        config.layer_types = [config.layer_types[i] for i in keep]


def describe_structure(model: nn.Module) -> dict[str, Any] | None:
    """Per-block sizes `{"layers": n, "per_layer": [{"heads", "kv_heads", "intermediate"}, ...]}`,
    or None when the model is not a supported family."""
    try:
        _, blocks = find_blocks(model)
    except UserError:
        return None
    family = _family(blocks[0])
    if family is None:
        return None
    parts = [BlockParts(i, b, family) for i, b in enumerate(blocks)]
    return {"layers": len(parts), "per_layer": [p.sizes() for p in parts]}


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Shrink a freshly built model to recorded sizes (the weights are loaded afterwards)."""
    parts = block_parts(model, "loading a structurally pruned model")
    per_layer = structure["per_layer"]
    if len(parts) > structure["layers"]:
        keep_blocks(model, range(structure["layers"]))
        parts = block_parts(model)
    if len(parts) != len(per_layer):
        raise UserError(f"artifact structure lists {len(per_layer)} layers but the model has {len(parts)}.")
    for p, sizes in zip(parts, per_layer):
        if (p.heads, p.kv_heads) != (sizes["heads"], sizes["kv_heads"]):
            resize_attention(p, torch.arange(sizes["heads"]), torch.arange(sizes["kv_heads"]))
        if p.intermediate != sizes["intermediate"]:
            keep_neurons(p, torch.arange(sizes["intermediate"]))


def sync_config(model: nn.Module) -> None:
    """Make the HF config describe the pruned model where one number can: layer count, and
    intermediate size / head counts when every block has the same and transformers accepts them.
    (BERT derives its head size from hidden_size / num_attention_heads, so its config cannot
    describe fewer heads.) Otherwise the config keeps the larger sizes and only the artifact's
    `structure` entry describes the blocks."""
    parts = block_parts(model)
    config = model.config
    config.num_hidden_layers = len(parts)
    sizes = [p.sizes() for p in parts]
    if len({s["intermediate"] for s in sizes}) == 1:
        config.intermediate_size = sizes[0]["intermediate"]
    uniform = len({(s["heads"], s["kv_heads"]) for s in sizes}) == 1
    # transformers' LlamaConfig insists that hidden_size is a multiple of num_attention_heads
    if parts[0].family == "llama" and uniform and config.hidden_size % sizes[0]["heads"] == 0:
        config.head_dim = parts[0].head_dim  # explicit: it no longer equals hidden / heads
        config.num_attention_heads = sizes[0]["heads"]
        config.num_key_value_heads = sizes[0]["kv_heads"]
