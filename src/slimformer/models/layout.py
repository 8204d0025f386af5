"""Where the Transformer blocks and their linear layers are, for any architecture family.

Found structurally, in one place: the blocks are the longest `nn.ModuleList` whose entries share
one class (`model.layers` in Llama/Qwen/Gemma, `encoder.layer` in BERT, `transformer.h` in GPT-2,
`decoder.layers` in OPT), and the linear layers are `nn.Linear` or GPT-2's `Conv1D`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import torch
from torch import nn

from slimformer.errors import UserError


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style models store linear weights transposed, in transformers' Conv1D. Looked up in
    sys.modules rather than imported: a model holding a Conv1D has imported it already, and importing
    slimformer should not import transformers."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for modules computing y = x W^T + b (nn.Linear, Conv1D, and our QuantLinear)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or getattr(module, "is_slimformer_linear", False)


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view sharing storage with the module."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    if _is_conv1d(module):
        return module.weight.data.t()  # Conv1D stores (in, out)
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the model's Transformer blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UserError(
            f"could not find Transformer blocks in {type(model).__name__}: expected a ModuleList of "
            "identical blocks containing linear layers."
        )
    return best


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside the Transformer blocks, by qualified name (the default targets)."""
    prefix, _ = find_blocks(model)
    return {
        name: m for name, m in model.named_modules() if name.startswith(prefix + ".") and is_linear(m)
    }


def all_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer in the model (embeddings excluded), by qualified name."""
    return {name: m for name, m in model.named_modules() if name and is_linear(m)}


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    """`re:REGEX` searches the name; a plain string matches the full name, a dotted suffix of it,
    or the module's class name."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern


def select_linears(
    model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """Linear layers chosen by name patterns: `targets` (default: those in the blocks) minus `ignore`.

    Raises UserError when a target or ignore pattern matches no layer, or nothing is left.
    """
    if targets:
        pool = all_linears(model)
        chosen = {}
        for pattern in targets:
            hits = {n: m for n, m in pool.items() if _matches(pattern, n, m)}
            if not hits:
                raise UserError(_no_match("targets", pattern, pool))
            chosen.update(hits)
    else:
        chosen = block_linears(model)
    for pattern in ignore:
        hits = [n for n, m in chosen.items() if _matches(pattern, n, m)]
        if not hits and not any(_matches(pattern, n, m) for n, m in all_linears(model).items()):
            raise UserError(_no_match("ignore", pattern, all_linears(model)))
        for n in hits:
            del chosen[n]
    if not chosen:
        raise UserError("targets minus ignore leaves no layer to compress; widen `targets` or shorten `ignore`.")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


def _no_match(key: str, pattern: str, pool: dict[str, nn.Module]) -> str:
    examples = ", ".join(list(pool)[:4])
    return (
        f"{key} pattern '{pattern}' matches no linear layer of this model; layer names look like "
        f"{examples} ... (use a full name, a suffix such as 'mlp.down_proj', a class name, or 're:REGEX')."
    )
