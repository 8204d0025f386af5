"""The layer-wise calibration engine shared by every data-driven method (GPTQ, SparseGPT, Wanda,
AWQ, SmoothQuant, static observers); what it feeds the layers' inputs to is in `collectors.py`.

It captures the inputs of the first Transformer block on the calibration windows, then for each
block in turn: lets the method observe the block (hooks on its layers while the block runs on its
inputs), lets the method change the block, and runs the *changed* block to produce the next
block's inputs. Only one block's activations are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimformer.checkpoint import BlockCheckpoint
from slimformer.context import StepContext, track
from slimformer.errors import UserError
from slimformer.models.layout import find_blocks
from slimformer.models.placement import (
    HOST, compute_dtype_for, model_dtype, onloaded, release_host_memory, to_device,
)


class _Captured(Exception):
    """Raised by the last block's recorder: every block's arguments are taken, nothing else is needed."""


@dataclass
class BlockInputs:
    """Positional and keyword inputs of one block, one entry per calibration batch; `later` holds
    the other arguments of each later block (per batch, their hidden-state slot None): blocks of
    different kinds get different ones (Gemma-3's full-attention blocks another rope table than
    its sliding-window blocks, other masks)."""

    calls: list[tuple[tuple, dict[str, Any]]]
    later: list[list[tuple[tuple, dict[str, Any]]]] = field(default_factory=list)
    spilled_to: torch.device | None = None  # set when the calls are kept on the host for a device they do not fit on

    def batches(self) -> Iterator[tuple[tuple, dict[str, Any]]]:
        """Each batch's call arguments, where the blocks compute (moved there one batch at a time
        when the activations are spilled to the host)."""
        for args, kwargs in self.calls:
            yield (args, kwargs) if self.spilled_to is None else to_device((args, kwargs), self.spilled_to, memo={})

    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """Hidden-state outputs of `block` for every batch (kept where the inputs are kept)."""
        with torch.inference_mode():
            out = [_hidden(block(*args, **kwargs)) for args, kwargs in self.batches()]
        return out if self.spilled_to is None else [h.to(HOST) for h in out]

    def replace_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        """The same calls with new hidden states."""
        calls = [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(self.calls, hidden)]
        return BlockInputs(calls, self.later, self.spilled_to)

    def advance(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        """The next block's inputs: `hidden` (this block's outputs) with the next block's own other
        arguments (this block's when none were recorded)."""
        if not self.later:
            return self.replace_hidden(hidden)
        calls = [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(self.later[0], hidden)]
        return BlockInputs(calls, self.later[1:], self.spilled_to)


def _with_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor | None) -> tuple[tuple, dict[str, Any]]:
    """A block call with `hidden` in its hidden-state slot (the first positional argument, else
    the `hidden_states` keyword); None empties the slot."""
    if args:
        return (hidden, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": hidden}


def _hidden_in(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _like(output: Any, hidden: torch.Tensor) -> Any:
    """`hidden` in the structure of a block's `output` (a tensor, or a tuple whose first item it is)."""
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


def capture_first_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                               device: torch.device | None = None, dtype: torch.dtype | None = None,
                               spill: bool | None = None) -> BlockInputs:
    """Run the model's embedding stage on `windows` (n, T) where the model is, and record every
    block's call arguments: block 0's in full, the later blocks' without their hidden states (moved
    to `device`, floating tensors cast to `dtype` when given: the blocks compute there, in that
    precision; a tensor several blocks share stays one tensor).

    The blocks are not computed: each one's forward is swapped, for this pass only, for a recorder
    that hands its input hidden states on unchanged (block 0 runs once, on the first batch, so the
    recorders return what a block returns), and the last one stops the pass.

    With `dtype` above the model's own (a bf16 model calibrating in fp32), the model-level rotary
    tables are computed in `dtype` too: Hugging Face rounds cos/sin to the hidden states' dtype, and
    calibrating on bf16-rounded tables cost 1.6-1.8% perplexity on SmolLM2 (SparseGPT 50%, GPTQ W4)
    against the same checkpoint calibrated in fp32.

    When the recorded inputs do not fit on `device` (`activations_fit`; `spill` forces the choice),
    they are kept in host memory and each batch moves to the device for its turn (`BlockInputs.batches`)."""
    _, blocks = find_blocks(model)
    calls: list[list[tuple[tuple, dict[str, Any]]]] = [[] for _ in blocks]
    real = blocks[0].forward
    output: list[Any] = []  # block 0's real output on the first batch: the structure recorders return
    stored = model_dtype(model)
    precise_tables = dtype is not None and dtype != stored

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = _hidden_in(args, kwargs)
            calls[index].append((args, dict(kwargs)) if index == 0 else _with_hidden(args, kwargs, None))
            if index == len(blocks) - 1:
                raise _Captured
            if not output:  # in the block's own dtype (the rotary tables may be in `dtype`)
                output.append(real(*to_device(args, None, stored), **to_device(kwargs, None, stored)))
            return _like(output[0], hidden)
        return forward

    saved = [block.__dict__.get("forward") for block in blocks]  # an instance forward (a hook library's) is put back
    tables = _rotary_tables(model, blocks) if precise_tables else []
    handles = [m.register_forward_pre_hook(_upcast_first(dtype)) for m in tables]
    try:
        for index, block in enumerate(blocks):
            block.forward = recorder(index)
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size]
                try:
                    model(input_ids=batch, attention_mask=torch.ones_like(batch), **_no_cache(model))
                except _Captured:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in zip(blocks, saved):
            del block.forward
            if forward is not None:
                block.forward = forward
    if spill is None:
        spill = device is not None and not activations_fit(calls, device, dtype)
    first, *later = to_device(calls, HOST if spill else device, dtype, memo={})
    return BlockInputs(first, later, device if spill else None)


def _tensor_bytes(obj: Any, dtype: torch.dtype | None, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        size = (dtype if dtype is not None and obj.is_floating_point() else obj.dtype).itemsize
        return obj.numel() * size
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(x, dtype, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, dtype, seen) for x in obj.values())
    return 0


def activations_fit(calls: Any, device: torch.device, dtype: torch.dtype | None = None,
                    free_bytes: int | None = None) -> bool:
    """Whether the recorded block inputs `calls` fit on `device` next to a block's outputs and its
    work: twice their bytes (inputs and outputs are alive together) within half the free memory
    (the rest for the block, its Hessians and the method's workspace). The host always fits: it
    is where they would spill to."""
    if device.type != "cuda" and free_bytes is None:
        return True
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return 2 * _tensor_bytes(calls, dtype, set()) <= free_bytes // 2


def _rotary_tables(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The model's rotary-embedding modules outside its blocks (Llama's `rotary_emb`, Gemma-3's
    global and local ones): they take the hidden states only for their dtype and device."""
    inside = {id(m) for block in blocks for m in block.modules()}
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and id(m) not in inside]


def _upcast_first(dtype: torch.dtype) -> Callable[[nn.Module, tuple], tuple]:
    def hook(_m: nn.Module, args: tuple) -> tuple:
        return (args[0].to(dtype), *args[1:]) if args and torch.is_tensor(args[0]) else args
    return hook


def _no_cache(model: nn.Module) -> dict[str, Any]:
    return {"use_cache": False} if hasattr(model, "generate") else {}


BlockFn = Callable[[int, nn.Module, BlockInputs], dict[str, Any] | None]


def run_layerwise(
    model: nn.Module, windows: torch.Tensor, process_block: BlockFn, ctx: StepContext | None = None,
    batch_size: int = 8, after_block: Callable[[int, BlockInputs], None] | None = None,
) -> list[dict[str, Any]]:
    """Call `process_block(index, block, inputs)` for each block, feeding compressed outputs forward.

    `process_block` observes (e.g. with `observe_linears`) and modifies the block in place; what it
    returns must be JSON-able (it is saved with the block). With `ctx.checkpoint` set, each finished
    block is saved there, and with `ctx.resume` the saved blocks are restored instead of recomputed.
    `after_block(index, next_inputs)` runs once a block is done.

    The blocks compute on `ctx.device` (default: where the weights are): each moves there for its
    turn and back to the host after, and the activations stay there, so the device holds one block
    and its activations at a time. A bf16/fp16 model's blocks compute in fp32 while they are
    calibrated (`compute_dtype_for`), and are rounded back to the stored dtype after.
    """
    _, blocks = find_blocks(model)
    device = ctx.device if ctx is not None else None
    precise = compute_dtype_for(model)
    checkpoint = BlockCheckpoint(ctx.checkpoint, ctx.fingerprint) if ctx is not None and ctx.checkpoint is not None else None
    start, infos = 0, []
    if checkpoint is not None and ctx is not None and ctx.resume:
        start = checkpoint.finished(len(blocks))
        infos = checkpoint.restore(blocks, start)
    if start == len(blocks):
        return infos
    inputs = capture_first_block_inputs(model, windows, batch_size, device, precise)
    for index in range(start):  # the restored blocks recreate the inputs of block `start` exactly
        with onloaded(blocks[index], device, precise):
            inputs = inputs.advance(inputs.run(blocks[index]))
    for index in track(ctx, range(start, len(blocks)), "blocks", len(blocks) - start):
        block = blocks[index]
        with onloaded(block, device, precise):
            infos.append(process_block(index, block, inputs) or {})
            if device is not None:
                block.to(device)  # layers the method swapped in were built on the host
            inputs = inputs.advance(inputs.run(block))
        release_host_memory()
        if checkpoint is not None:
            checkpoint.save(index, block, infos[-1])
        if after_block is not None:
            after_block(index, inputs)
    return infos


LayersFn = Callable[[int, nn.Module, BlockInputs, dict[str, nn.Module]], dict[str, Any]]


def run_on_targets(
    model: nn.Module, selected: dict[str, nn.Module], windows: torch.Tensor, process: LayersFn,
    ctx: StepContext | None = None,
) -> list[dict[str, Any]]:
    """`run_layerwise` for methods that replace chosen layers: `process(index, block, inputs, layers)`
    gets the `selected` layers inside that block, by full name; a block holding none is only run.
    A layer the method swaps for another (a quantized layer) is replaced in `selected` too, so the
    original's weight is freed with its block instead of at the end of the run."""

    def per_block(index: int, block: nn.Module, inputs: BlockInputs) -> dict[str, Any]:
        layers = block_targets(model, block, selected)
        info = process(index, block, inputs, layers) if layers else {}
        for name in layers:
            selected[name] = model.get_submodule(name)
        return info

    return run_layerwise(model, windows, per_block, ctx)


class _Observed(Exception):
    """Raised once the block's last target layer has taken its input: the rest of the forward pass
    feeds nothing a collector reads."""


def observe_linears(
    block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, on_input: Callable[[str, torch.Tensor], None]
) -> None:
    """Run `block` on `inputs`, calling `on_input(name, x)` with each target layer's input (tokens, in).

    The first batch runs whole. When every target took exactly one input there (a dense block), the
    later batches stop right after the last of them: its own matmul and whatever follows it (a Llama
    block's down_proj, a quarter of its weights) would only make outputs nobody reads. A block whose
    layers fire a varying number of times (routed experts) runs whole every time."""
    handles = []
    last: list[torch.Tensor] = []  # [raw input, its fp32 rows]: layers fed the same tensor get the same rows
    fired: list[str] = []  # the target layers that took an input in this batch, in order
    stop_after: list[str] = []  # the name after whose input a batch may stop (set after batch 1)

    def hook(_m: nn.Module, args: tuple, _name: str) -> None:
        x = args[0]
        if not (last and last[0] is x):
            # a bf16/fp16 input is upcast once, so collectors still see q/k/v share one tensor
            last[:] = [x, x.reshape(-1, x.shape[-1]).float()]
        on_input(_name, last[1])
        fired.append(_name)
        if stop_after and _name == stop_after[0]:
            raise _Observed

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda m, a, _name=name: hook(m, a, _name)))
    try:
        with torch.inference_mode():
            for batch, (args, kwargs) in enumerate(inputs.batches()):
                fired.clear()
                try:
                    block(*args, **kwargs)
                except _Observed:
                    pass
                if batch == 0 and sorted(fired) == sorted(layers):
                    stop_after[:] = fired[-1:]
    finally:
        last.clear()
        for h in handles:
            h.remove()


def block_targets(model: nn.Module, block: nn.Module, selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The selected layers that live inside `block`, by full name."""
    inside = {id(m) for m in block.modules()}
    return {name: m for name, m in selected.items() if id(m) in inside}


def iter_batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Row batches of a (n, T) tensor."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def calibration_inputs(ctx: StepContext | None, num_samples: int, seq_len: int, method: str) -> torch.Tensor:
    """`ctx.calibration_windows(...)`; UserError when a method that needs data runs without a context."""
    if ctx is None:
        raise UserError(f"{method} needs calibration data (--calib, or calib= in Python) and a tokenizer.")
    return ctx.calibration_windows(num_samples, seq_len, method)
