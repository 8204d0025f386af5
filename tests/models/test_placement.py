"""--device / --dtype resolution, one-block onloading with an fp32 upcast, and the calibration engine
on a bf16 model (tiny tensors; the SmolLM2 tier is test_bf16_model.py)."""

from __future__ import annotations

import copy
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slimformer.calibrate.collectors import HessianCollector
from slimformer.calibrate.engine import observe_linears, run_layerwise
from slimformer.context import StepContext
from slimformer.errors import UserError
from slimformer.models.layout import find_blocks
from slimformer.models.placement import (
    compute_dtype_for, model_dtype, onloaded, resolve_device, resolve_dtype, to_device,
)
from tests.tiny import tiny_ctx, tiny_llama

NO_GPU = not torch.cuda.is_available()


def test_auto_device_is_the_cpu_without_a_gpu() -> None:
    if not NO_GPU:
        pytest.skip("a GPU is present: auto picks it")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", "cuda:-1"])
def test_unknown_devices_are_refused(spec: str) -> None:
    with pytest.raises(UserError, match="--device"):
        resolve_device(spec)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_that_is_not_there_is_refused(spec: str) -> None:
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device(spec)


def test_auto_dtype_follows_the_config() -> None:
    assert resolve_dtype("auto", SimpleNamespace(dtype="bfloat16")) == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(dtype=torch.float16)) == torch.float16
    assert resolve_dtype("auto", SimpleNamespace(torch_dtype="float32")) == torch.float32
    assert resolve_dtype("auto", SimpleNamespace()) == torch.float32  # no dtype named: fp32
    assert resolve_dtype("auto", SimpleNamespace(dtype="int8")) == torch.float32  # not a float type
    assert resolve_dtype("bfloat16", SimpleNamespace(dtype="float32")) == torch.bfloat16
    with pytest.raises(UserError, match="--dtype 'int4'"):
        resolve_dtype("int4")


def test_to_device_casts_floating_tensors_only() -> None:
    obj = ((torch.ones(2, dtype=torch.bfloat16), torch.arange(3)), {"mask": torch.ones(2, dtype=torch.bool), "n": 3})
    out = to_device(obj, None, torch.float32)
    assert out[0][0].dtype == torch.float32 and out[0][1].dtype == torch.int64
    assert out[1]["mask"].dtype == torch.bool and out[1]["n"] == 3


def test_onloaded_upcasts_then_rounds_back_and_keeps_swapped_layers() -> None:
    block = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(torch.bfloat16)
    before = block[0].weight.detach().clone()
    with onloaded(block, None, torch.float32):
        assert all(p.dtype == torch.float32 for p in block.parameters())
        block[0].weight.data.add_(1e-3)  # an fp32 update, rounded to bf16 on the way out
        block[1] = nn.Linear(4, 4)  # a swapped-in layer keeps its own dtype
    assert block[0].weight.dtype == torch.bfloat16 and block[1].weight.dtype == torch.float32
    assert torch.equal(block[0].weight, (before.float() + 1e-3).to(torch.bfloat16))


def test_onloaded_frees_a_swapped_out_layer_inside_the_body() -> None:
    """A layer the method swaps out is freed when the method drops it, not when the block is done
    (its fp32 upcast weights: 0.64 GB of a Llama-3-8B block while GPTQ works on down_proj)."""
    block = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(torch.bfloat16)
    with onloaded(block, None, torch.float32):
        gone = weakref.ref(block[0])
        block[0] = nn.Linear(4, 4)
        assert gone() is None


def test_gptq_frees_each_float_layer_once_it_is_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    """When GPTQ reaches a block's down_proj, the block's six layers quantized before it are gone
    (bf16 model: their fp32 upcasts too)."""
    from slimformer.quant import gptq as gptq_module
    from slimformer.recipe import Recipe

    model = tiny_llama(0).to(torch.bfloat16)
    block = find_blocks(model)[1][0]
    earlier = [weakref.ref(m) for m in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                                        block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj)]
    alive_at_call: list[int] = []
    real = gptq_module.gptq_quantize

    def counting(*args, **kwargs):
        alive_at_call.append(sum(r() is not None for r in earlier))
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", counting)
    Recipe.coerce("steps: [{method: gptq, bits: 4, group_size: 32, num_samples: 4, seq_len: 32}]").apply(
        model, tiny_ctx("the quick brown fox jumps over the lazy dog; " * 40))
    assert alive_at_call[:7] == [6, 5, 4, 3, 2, 1, 0], alive_at_call


def test_onloaded_leaves_non_modules_alone() -> None:
    session = object()
    with onloaded(session, torch.device("cpu"), torch.float32) as same:
        assert same is session


def test_bf16_q_k_v_still_share_one_hessian() -> None:
    """observe_linears upcasts a bf16 input once, so layers fed the same tensor stay aliased."""
    model = tiny_llama(0).to(torch.bfloat16)
    _, blocks = find_blocks(model)
    attn = blocks[0].self_attn
    layers = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    from slimformer.calibrate.engine import capture_first_block_inputs

    inputs = capture_first_block_inputs(model, ids)
    hessians = HessianCollector("test")
    observe_linears(blocks[0], layers, inputs, hessians)
    assert hessians.alias == {"k": "q", "v": "q"} and list(hessians.sums) == ["q"]
    assert hessians.get("q").dtype == torch.float32


def test_engine_computes_a_bf16_model_in_fp32_and_keeps_it_bf16() -> None:
    """The blocks see fp32 activations (the same as the fp32 model's, within bf16 weight rounding) and
    the model leaves the engine in bf16."""
    fp32 = tiny_llama(0)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert compute_dtype_for(bf16) == torch.float32 and compute_dtype_for(fp32) is None
    ids = torch.randint(0, fp32.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    seen: dict[str, list[torch.Tensor]] = {"fp32": [], "bf16": []}

    def recorder(key: str):
        def per_block(index: int, block: nn.Module, inputs) -> None:
            assert all(p.dtype == torch.float32 for p in block.parameters())
            seen[key].append(inputs.calls[0][0][0] if inputs.calls[0][0] else inputs.calls[0][1]["hidden_states"])
        return per_block

    run_layerwise(fp32, ids, recorder("fp32"), StepContext(progress=False))
    run_layerwise(bf16, ids, recorder("bf16"), StepContext(progress=False))
    assert model_dtype(bf16) == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    for a, b in zip(seen["fp32"], seen["bf16"]):
        assert b.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.999


def test_a_bf16_model_calibrates_on_fp32_rotary_tables() -> None:
    """The engine records a bf16 model's cos/sin as the fp32 model computes them, not rounded to bf16
    (which cost 1.6-1.8% perplexity on SmolLM2), and leaves no hook behind."""
    from slimformer.calibrate.engine import capture_first_block_inputs

    fp32 = tiny_llama(0, max_position_embeddings=512)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.model.rotary_emb.inv_freq = fp32.model.rotary_emb.inv_freq.clone()  # fp32, as from_pretrained leaves it
    ids = torch.randint(0, fp32.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(1))
    want = capture_first_block_inputs(fp32, ids).calls[0][1]["position_embeddings"]
    got = capture_first_block_inputs(bf16, ids, dtype=torch.float32).calls[0][1]["position_embeddings"]
    rounded = capture_first_block_inputs(bf16, ids).calls[0][1]["position_embeddings"]
    for w, g, r in zip(want, got, rounded):
        assert g.dtype == torch.float32 and r.dtype == torch.bfloat16
        assert torch.equal(g, w)
        assert float((r.float() - w).abs().max()) > 1e-3  # what the tables were before: bf16-rounded
    assert not bf16.model.rotary_emb._forward_pre_hooks


def test_gptq_on_a_bf16_tiny_model_matches_the_fp32_path() -> None:
    from slimformer.recipe import Recipe

    fp32 = tiny_llama(0)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    recipe = Recipe.coerce("steps: [{method: gptq, bits: 4, group_size: 32, num_samples: 4, seq_len: 32}]")
    ctx = tiny_ctx("the quick brown fox jumps over the lazy dog; " * 40)
    recipe.apply(fp32, ctx)
    recipe.apply(bf16, ctx)
    name = "model.layers.0.mlp.down_proj"
    a, b = fp32.get_submodule(name), bf16.get_submodule(name)
    agree = (a.codes == b.codes).float().mean()
    assert agree > 0.95, f"only {agree:.3f} of the codes agree"
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_a_bf16_tiny_model_keeps_its_masks(method: str) -> None:
    """The block's weights are fp32 copies while it calibrates and are rounded back after: the masks
    must land on those copies, so every target layer of the bf16 model leaves exactly half zeros
    (a tensor taken before the run was pruned and then dropped, leaving the model dense)."""
    from slimformer.recipe import Recipe

    model = tiny_llama(0).to(torch.bfloat16)
    recipe = Recipe.coerce(f"steps: [{{method: {method}, sparsity: 0.5, num_samples: 4, seq_len: 32}}]")
    info = recipe.apply(model, tiny_ctx("the quick brown fox jumps over the lazy dog; " * 40))
    _, blocks = find_blocks(model)
    linears = [m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    for m in linears:
        assert int((m.weight == 0).sum()) == m.weight.numel() // 2
    assert info[0]["sparsity"] == pytest.approx(0.5)
