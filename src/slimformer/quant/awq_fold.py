"""AWQ's folded form (`fold: true`): one scale per shared input, folded into the op producing it.

The reference implementation (llm-awq `apply_scale`, AutoAWQ, llm-compressor's AWQModifier
mappings) never keeps a per-input-channel scale in the quantized layer. Within a block, the layers
reading the same input share one scale s (searched jointly: their weights concatenated along the
output dimension, so the error minimised is the sum of their output errors); their weight columns
are multiplied by s and the op producing that input is divided by s, which leaves the float
function unchanged. For Llama-style blocks (Llama, Mistral, Qwen2, Qwen3):

    input_layernorm           -> q_proj, k_proj, v_proj
    v_proj (output rows)      -> o_proj      (only without grouped-query attention)
    post_attention_layernorm  -> gate_proj, up_proj
    up_proj (output rows)     -> down_proj

With grouped-query attention v_proj has fewer output rows than o_proj has inputs (each value head
serves several query heads), so one row of v cannot absorb one column's scale: as the reference,
o_proj is then quantized with s = 1. Blocks of any other class are refused: their norm/linear pairs
(Gemma's 1 + weight norms, Gemma2's extra norms, fused qkv projections) are not these.
Module walking is small and explicit here; the search itself is `awq_math.awq_search`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimformer.errors import UserError
from slimformer.models.structure import BlockParts
from slimformer.quant.awq_math import awq_search

# decoder-layer classes whose norms compute weight * normalized(x) and feed exactly these linears
FOLDABLE_BLOCKS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_HINT = "use `fold: false` (each layer keeps its own input_scale) for it"


@dataclass(frozen=True)
class FoldGroup:
    """Linears `members` (paths inside the block) read the output of `source` (a norm or a linear)."""

    source: str
    members: tuple[str, ...]
    source_is_linear: bool


def fold_groups(block: nn.Module, index: int) -> list[FoldGroup]:
    """The fold groups of one block, in the order they are searched; UserError for other families."""
    kind = type(block).__name__
    if kind not in FOLDABLE_BLOCKS:
        raise UserError(f"awq fold: block {index} is a {kind}, whose norm/linear pairs are not known "
                        f"(supported: {', '.join(FOLDABLE_BLOCKS)}); {_HINT}.")
    parts = BlockParts(index, block, "llama")  # the module paths structure.py knows for this family
    q, k, v, o, down = (parts.path(r) for r in ("q", "k", "v", "o", "mlp_out"))
    gate, up = "mlp.gate_proj", "mlp.up_proj"
    return [FoldGroup("input_layernorm", (q, k, v), False), FoldGroup(v, (o,), True),
            FoldGroup("post_attention_layernorm", (gate, up), False), FoldGroup(up, (down,), True)]


def active_groups(groups: list[FoldGroup], targets: set[str], index: int) -> list[FoldGroup]:
    """The groups whose members are all targets; UserError when a target belongs to no group or the
    targets split a group (its shared scale would also change the layers left out)."""
    known = {m for g in groups for m in g.members}
    for name in sorted(targets - known):
        raise UserError(f"awq fold: block {index} layer '{name}' is not a layer whose input producer is known "
                        f"(known: {', '.join(sorted(known))}); {_HINT}.")
    active = []
    for g in groups:
        chosen = [m for m in g.members if m in targets]
        if chosen and len(chosen) < len(g.members):
            missing = ", ".join(m for m in g.members if m not in targets)
            raise UserError(f"awq fold: block {index}: the targets select {', '.join(chosen)} but not {missing}, "
                            f"which read the same input and must share one scale; target all of "
                            f"{', '.join(g.members)}, or {_HINT}.")
        if chosen:
            active.append(g)
    return active


def can_fold(block: nn.Module, group: FoldGroup, index: int) -> bool:
    """Whether `group.source` can absorb 1/s. False only for a linear source of another width
    (v_proj -> o_proj under grouped-query attention); UserError for a source that is no plain op."""
    source = block.get_submodule(group.source)
    width = block.get_submodule(group.members[0]).in_features
    if group.source_is_linear:
        if type(source) is not nn.Linear:
            raise UserError(f"awq fold: block {index} {group.source} is a {type(source).__name__}, not a float "
                            f"nn.Linear, so it cannot absorb the scale of {group.members[0]}; {_HINT}.")
        return source.out_features == width
    weight = getattr(source, "weight", None)
    if not isinstance(weight, Tensor) or weight.shape != (width,):
        raise UserError(f"awq fold: block {index} {group.source} has no ({width},) weight to absorb the scale; "
                        f"{_HINT}.")
    return True


def joint_search(weights: list[Tensor], h: Tensor, act_mean: Tensor, bits: int, group_size: int, symmetric: bool,
                 grid: int, duo: bool, **rules: str) -> tuple[Tensor, float, float, bool]:
    """`awq_search` for layers sharing one input: their (out_k, in) weights stacked into one
    (sum out_k, in), so that the error scored is the sum of their output errors."""
    w = torch.cat([x.float() for x in weights], dim=0)
    return awq_search(w, h, act_mean, bits, group_size, symmetric, grid, duo, **rules)


@torch.no_grad()
def fold_scale(block: nn.Module, group: FoldGroup, s: Tensor) -> None:
    """Multiply the members' weight columns by s and divide the source's output by s (norm weight
    and bias, or a linear's output rows and bias), in float; the block computes the same function."""
    source = block.get_submodule(group.source)
    divide_output(source, s, rows=group.source_is_linear)
    for path in group.members:
        w = block.get_submodule(path).weight
        w.copy_((w.float() * s[None, :]).to(w.dtype))


def divide_output(module: nn.Module, s: Tensor, rows: bool) -> None:
    """Divide a norm's weight (`rows=False`) or a linear's output rows (`rows=True`) and bias by s."""
    w = module.weight
    w.copy_((w.float() / (s[:, None] if rows else s)).to(w.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))


def scaled_moment(h: Tensor, s: Tensor | None) -> Tensor:
    """The second moment of x / s from that of x: H / (s s^T) (H itself for s = None)."""
    return h if s is None else h / (s[:, None] * s[None, :])
