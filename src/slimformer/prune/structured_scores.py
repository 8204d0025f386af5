"""Importance of heads, FFN neurons and blocks measured on calibration data.

Heads and neurons are scored through multiplicative *gates*: a forward pre-hook on the attention
output projection multiplies each head's slice of its input by a gate (one per head), and one on
the FFN output projection each neuron. Gates at 1 change nothing; their gradient gives the
first-order Taylor importance ("Are Sixteen Heads Really Better than One?"), setting one to 0
masks that unit (information-based importance, and the tests' masked reference model).

Loss: decoders use the language-model loss; encoders (no head to train) a fixed random projection
of the last hidden state, whose gate gradients estimate how far the output moves per unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from slimformer.calibrate.engine import BlockInputs, iter_batches, run_layerwise
from slimformer.context import StepContext, track
from slimformer.evaluate.divergence import output_divergence
from slimformer.models.grads import only_trainable
from slimformer.models.structure import BlockParts
from slimformer.prune.structured_math import block_influence

Unit = Literal["heads", "neurons"]


@contextmanager
def gates(parts: list[BlockParts], unit: Unit, requires_grad: bool = False) -> Iterator[list[Tensor]]:
    """Install one gate per head (or neuron) of every block; yields the gate tensors (ones)."""
    tensors, handles = [], []
    for p in parts:
        if unit == "heads":
            layer, n, width = p.get("o"), p.heads, p.head_dim
        else:
            layer, n, width = p.get("mlp_out"), p.intermediate, 1
        g = torch.ones(n, requires_grad=requires_grad)
        tensors.append(g)

        def hook(_m: nn.Module, args: tuple, g: Tensor = g, n: int = n, width: int = width) -> tuple:
            x = args[0]  # (B, T, n * width)
            gated = x.reshape(*x.shape[:-1], n, width) * g.to(x.dtype)[:, None]
            return (gated.reshape(x.shape), *args[1:])

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield tensors
    finally:
        for h in handles:
            h.remove()


def _output(model: nn.Module, batch: Tensor, kind: str) -> Tensor:
    """Log-probabilities (decoders) or last hidden states (encoders), (B, T, ·)."""
    mask = torch.ones_like(batch)
    if kind == "decoder":
        return torch.log_softmax(model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
    return model(input_ids=batch, attention_mask=mask).last_hidden_state.float()


def _gate_loss(model: nn.Module, batch: Tensor, kind: str, index: int) -> Tensor:
    """The loss whose gate gradients are scored: the LM loss (decoders), or for encoders a random
    projection of the last hidden states (seeded by the batch `index`): |dL/dgate| summed over
    batches then measures how strongly a unit moves the output in random directions, where
    `gradient`'s output energy (per weight) measures how much it feeds the output's norm."""
    mask = torch.ones_like(batch)
    if kind == "decoder":
        return model(input_ids=batch, attention_mask=mask, labels=batch, use_cache=False).loss
    h = model(input_ids=batch, attention_mask=mask).last_hidden_state  # (B, T, hidden)
    r = torch.randn(h.shape, generator=torch.Generator().manual_seed(index), dtype=h.dtype)
    return (h * r).sum() / h.shape[:-1].numel() ** 0.5


def taylor_scores(
    model: nn.Module, parts: list[BlockParts], unit: Unit, windows: Tensor, kind: str,
    ctx: StepContext | None = None, batch_size: int = 1,
) -> list[Tensor]:
    """Per block, sum over calibration batches of |gate * dL/dgate| (gates at 1: |dL/dgate|)."""
    scores = [torch.zeros(p.heads if unit == "heads" else p.intermediate) for p in parts]
    with only_trainable(model, eval_mode=True), gates(parts, unit, requires_grad=True) as gs:
        batches = list(iter_batches(windows, batch_size))
        for i, batch in enumerate(track(ctx, batches, f"{unit} taylor", len(batches))):
            grads = torch.autograd.grad(_gate_loss(model, batch, kind, i), gs)
            for s, g, gr in zip(scores, gs, grads):
                s += (g.detach() * gr).abs()
    return scores


@torch.no_grad()
def information_scores(
    model: nn.Module, parts: list[BlockParts], windows: Tensor, kind: str, ctx: StepContext | None = None,
    batch_size: int = 4,
) -> list[Tensor]:
    """Per head: how much the model's output changes when that head alone is masked, averaged over
    calibration tokens — KL(full || masked) of next-token distributions (decoders), 1 - cosine of
    the last hidden states (encoders). One forward pass per head and batch: slower than taylor."""
    scores = [torch.zeros(p.heads) for p in parts]
    with only_trainable(model, eval_mode=True), gates(parts, "heads") as gs:
        batches = list(iter_batches(windows, batch_size))
        total = len(batches) * sum(p.heads for p in parts)
        bar = iter(track(ctx, range(total), "heads information", total))
        for batch in batches:
            ref = _output(model, batch, kind)
            for s, g in zip(scores, gs):
                for h in range(g.numel()):
                    g[h] = 0.0
                    s[h] += output_divergence(ref, _output(model, batch, kind), kind) * batch.shape[0]
                    g[h] = 1.0
                    next(bar, None)
    return [s / windows.shape[0] for s in scores]


def magnitude_head_scores(parts: list[BlockParts]) -> list[Tensor]:
    """Per query head: ||o_proj columns|| * (||q rows|| + ||k rows|| + ||v rows||) / 3, the
    key/value rows those of the head's group. Needs no data."""
    scores = []
    for p in parts:
        d, n, kv = p.head_dim, p.heads, p.kv_heads
        o = p.get("o").weight.detach().reshape(-1, n, d).norm(dim=(0, 2))  # (n,)
        q = p.get("q").weight.detach().reshape(n, -1).norm(dim=1)
        k = p.get("k").weight.detach().reshape(kv, -1).norm(dim=1).repeat_interleave(n // kv)
        v = p.get("v").weight.detach().reshape(kv, -1).norm(dim=1).repeat_interleave(n // kv)
        scores.append(o * (q + k + v) / 3)
    return scores


def magnitude_neuron_scores(parts: list[BlockParts]) -> list[Tensor]:
    """Per FFN neuron: the product of its input-row norms and its output-column norm. No data."""
    scores = []
    for p in parts:
        s = p.get("mlp_out").weight.detach().norm(dim=0)
        for layer in p.mlp_in:
            s = s * layer.weight.detach().norm(dim=1)
        scores.append(s)
    return scores


def activation_neuron_scores(
    model: nn.Module, parts: list[BlockParts], windows: Tensor, ctx: StepContext | None = None
) -> list[Tensor]:
    """Per FFN neuron (Wanda-like): mean |activation| over calibration tokens × ||output column||,
    on the layer-wise engine (one block's activations in memory)."""
    sums = [torch.zeros(p.intermediate) for p in parts]
    tokens = [0]

    def per_block(index: int, block: nn.Module, inputs: BlockInputs) -> dict:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, intermediate)
            sums[index].add_(x.abs().sum(0))
            if index == 0:
                tokens[0] += x.shape[0]

        handle = parts[index].get("mlp_out").register_forward_pre_hook(hook)
        try:
            inputs.run(block)
        finally:
            handle.remove()
        return {}

    run_layerwise(model, windows, per_block, ctx)
    return [s / max(tokens[0], 1) * p.get("mlp_out").weight.detach().norm(dim=0) for s, p in zip(sums, parts)]


def cosine_block_scores(model: nn.Module, windows: Tensor, ctx: StepContext | None = None) -> Tensor:
    """Block influence (1 - cosine of each block's input and output hidden states), per block."""
    scores: list[float] = []
    held: list[list[Tensor]] = []

    def per_block(_index: int, _block: nn.Module, inputs: BlockInputs) -> dict:
        held[:] = [_hidden_of(args, kwargs) for args, kwargs in inputs.calls]
        return {}

    def after(_index: int, next_inputs: BlockInputs) -> None:
        out = [_hidden_of(args, kwargs) for args, kwargs in next_inputs.calls]
        scores.append(float(block_influence(torch.cat(held), torch.cat(out))))

    run_layerwise(model, windows, per_block, ctx, after_block=after)
    return torch.tensor(scores)


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def skip_block_scores(
    model: nn.Module, blocks: nn.ModuleList, windows: Tensor, kind: str, ctx: StepContext | None = None,
    batch_size: int = 4,
) -> Tensor:
    """Per block: the calibration loss with that block skipped (decoders: LM loss, so its
    exponential is the perplexity; encoders: 1 - cosine of last hidden states to the full model)."""
    batches = list(iter_batches(windows, batch_size))
    refs = [_output(model, b, kind) for b in batches] if kind == "encoder" else None
    scores = []
    for index in track(ctx, range(len(blocks)), "layers skip", len(blocks)):
        handle = blocks[index].register_forward_hook(_identity, with_kwargs=True)
        try:
            losses = []
            for i, batch in enumerate(batches):
                if kind == "decoder":
                    losses.append(float(model(input_ids=batch, labels=batch, use_cache=False).loss))
                else:
                    losses.append(output_divergence(refs[i], _output(model, batch, kind), kind))
            scores.append(sum(losses) / len(losses))
        finally:
            handle.remove()
    return torch.tensor(scores)


def _identity(_m: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    """Forward hook making a block return its input hidden states unchanged."""
    hidden = _hidden_of(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
