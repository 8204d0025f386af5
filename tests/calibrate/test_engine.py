"""The layer-wise engine reproduces the model's own forward pass when it changes nothing."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import tiny_llama  # tests/tiny.py

from slimformer.calibrate.engine import (
    BlockInputs, activations_fit, capture_first_block_inputs, observe_linears, run_layerwise,
)
from slimformer.models.layout import find_blocks


def test_engine_matches_full_forward() -> None:
    model = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=3, max_position_embeddings=2048)
    windows = torch.randint(0, 64, (5, 24))
    seen = []
    final = {}

    def process(index, block, inputs):
        seen.append((index, len(inputs.calls)))

    def after(index, inputs):
        final["hidden"] = torch.cat([args[0] for args, _ in inputs.calls])

    run_layerwise(model, windows, process, batch_size=2, after_block=after)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    with torch.inference_mode():
        out = model(input_ids=windows, output_hidden_states=True, use_cache=False)
    # hidden_states[-1] has the final norm applied; compare the pre-norm output through the norm
    assert torch.allclose(model.model.norm(final["hidden"]), out.hidden_states[-1], atol=1e-5)


def _observed(block, layers, inputs) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    observe_linears(block, layers, inputs, lambda name, x: seen.setdefault(name, []).append(x.clone()))
    return seen


def test_observe_stops_each_batch_after_the_last_target_and_sees_the_same_inputs() -> None:
    """After the first batch, a dense block stops right after the last target's input: down_proj's
    own forward runs once for 3 batches, and every layer still gets exactly the inputs it gets when
    the block runs whole (hooks on a plain forward)."""
    model = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=2048)
    inputs = capture_first_block_inputs(model, torch.randint(0, 64, (6, 16)), batch_size=2)
    block = find_blocks(model)[1][0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    whole: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: whole.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).clone()))
               for n, m in layers.items()]
    inputs.run(block)
    for h in handles:
        h.remove()
    down_calls = []
    handle = block.mlp.down_proj.register_forward_hook(lambda *_: down_calls.append(1))
    seen = _observed(block, layers, inputs)
    handle.remove()
    assert len(down_calls) == 1
    assert sorted(seen) == sorted(whole) and all(len(seen[n]) == 3 for n in seen)
    assert all(torch.equal(a, b) for n in seen for a, b in zip(seen[n], whole[n]))


def test_observe_runs_whole_blocks_when_a_layer_fires_more_than_once() -> None:
    """A block calling a target twice per forward (as routed experts may vary) is never cut short."""

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.a(x)))

    block = Twice()
    outputs = []
    block.b.register_forward_hook(lambda *_: outputs.append(1))
    inputs = BlockInputs([((torch.randn(2, 3, 4),), {}) for _ in range(3)])
    seen = _observed(block, {"a": block.a, "b": block.b}, inputs)
    assert len(outputs) == 3 and len(seen["a"]) == 6 and len(seen["b"]) == 3


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "qwen2-sliding"])
def test_engine_gives_each_block_its_own_mask_and_rope(family: str) -> None:
    """Blocks of two kinds (sliding-window and full attention; Gemma-3's with their own rope bases)
    get their own call arguments: every block's propagated output equals the model's own hidden
    state. With block 0's arguments replayed for all blocks (as before), the full-attention blocks
    saw the sliding window's mask and rope and drifted (real gemma3-270m: 289 off at block 5)."""
    shared = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(**shared, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"] * 2)
        model = transformers.Gemma3ForCausalLM(config)
    elif family == "gemma2":
        config = transformers.Gemma2Config(**shared, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**shared, use_sliding_window=True, sliding_window=4, max_window_layers=2)
        model = transformers.Qwen2ForCausalLM(config)
    model.eval()
    assert len(set(config.layer_types)) == 2
    windows = torch.randint(0, 64, (4, 24))
    outputs = {}
    run_layerwise(model, windows, lambda index, block, inputs: None, batch_size=2,
                  after_block=lambda index, inputs: outputs.setdefault(index, torch.cat([a[0] for a, _ in inputs.calls])))
    with torch.inference_mode():
        hidden = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    for index in range(config.num_hidden_layers - 1):  # the last entry of hidden_states has the final norm applied
        assert torch.allclose(outputs[index], hidden[index + 1], atol=1e-4), f"block {index} ({config.layer_types[index]})"


def test_activations_fit_keeps_twice_their_bytes_within_half_the_free_memory() -> None:
    """The spill rule: inputs and outputs are alive together (2x), and half the free memory is
    left for the block and the method. 3 x 4 x 8 fp32 = 384 bytes of inputs, shared table once."""
    table = torch.zeros(8)
    calls = [((torch.zeros(4, 8), table), {"mask": table}) for _ in range(3)]  # 3 * 128 + 32 bytes
    nbytes = 3 * 128 + 32
    cuda = torch.device("cuda")
    assert activations_fit(calls, cuda, free_bytes=4 * nbytes)
    assert not activations_fit(calls, cuda, free_bytes=4 * nbytes - 1)
    assert activations_fit(calls, cuda, dtype=torch.bfloat16, free_bytes=2 * nbytes)  # counted in bf16
    assert activations_fit(calls, torch.device("cpu"))  # the host is where they spill to


def test_spilled_inputs_give_the_same_outputs_block_after_block() -> None:
    """Inputs kept on the host and moved batch by batch (the spill path) give every block exactly
    the outputs the resident path gives, and stay spilled as they advance."""
    model = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=3, max_position_embeddings=2048)
    windows = torch.randint(0, 64, (5, 24))
    cpu = torch.device("cpu")
    resident = capture_first_block_inputs(model, windows, batch_size=2, device=cpu, spill=False)
    spilled = capture_first_block_inputs(model, windows, batch_size=2, device=cpu, spill=True)
    assert resident.spilled_to is None and spilled.spilled_to == cpu
    for block in find_blocks(model)[1]:
        a, b = resident.run(block), spilled.run(block)
        assert len(a) == 3 and all(torch.equal(x, y) and y.device == cpu for x, y in zip(a, b))
        resident, spilled = resident.advance(a), spilled.advance(b)
        assert spilled.spilled_to == cpu
