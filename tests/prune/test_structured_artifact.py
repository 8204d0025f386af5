"""Structurally pruned models survive `compress(..., output=)` + `slimformer.load` with identical
outputs, non-uniform sizes included; uniform ones also load with plain transformers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from tiny import tiny_llama as make_tiny_llama  # tests/tiny.py

import slimformer
from slimformer.context import StepContext
from slimformer.data.sources import load_data
from slimformer.evaluate.measure import EvalSettings
from slimformer.models.structure import block_parts
from slimformer.models.zoo import resolve_alias
from slimformer.recipe import Recipe

FAST_EVAL = EvalSettings(max_windows=2, latency=False, progress=False)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA 8 query / 2 key-value heads) with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("structured") / "llama"
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_alias("smollm2-135m"))
    model = make_tiny_llama(None, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=8, max_position_embeddings=1024)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run_steps(folder: Path, recipe: Recipe) -> torch.nn.Module:
    """The recipe's steps applied in-process, as `compress` applies them."""
    bundle = slimformer.models.loading.load_bundle(folder)
    ctx = StepContext(tokenizer=bundle.tokenizer, kind="decoder", calib=load_data("lee-news", "calib"), progress=False)
    model = copy.deepcopy(bundle.model)
    recipe.apply(model, ctx)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_non_uniform_round_trip(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = Recipe.from_dict({"steps": [
        {"method": "heads", "sparsity": 0.3, "scope": "global", "num_samples": 2, "seq_len": 64},
        {"method": "neurons", "sparsity": 0.4, "scope": "global", "multiple_of": 4, "num_samples": 2, "seq_len": 64},
        {"method": "layers", "num_layers": 1, "num_samples": 2, "seq_len": 64},
    ]})
    out = tmp_path / "out"
    report = slimformer.compress(tiny_llama, recipe, eval=FAST_EVAL, output=out, progress=False)
    structure = json.loads((out / "manifest.json").read_text())["structure"]
    assert structure["layers"] == 3
    sizes = structure["per_layer"]
    assert len({(s["heads"], s["intermediate"]) for s in sizes}) > 1  # non-uniform: only the manifest knows
    loaded = slimformer.load(out)
    assert [p.sizes() for p in block_parts(loaded)] == sizes
    expected = _run_steps(tiny_llama, recipe)
    assert [p.sizes() for p in block_parts(expected)] == sizes
    torch.testing.assert_close(_logits(loaded), _logits(expected), atol=0, rtol=0)
    assert report["compressed"]["params"] == sum(p.numel() for p in loaded.parameters())
    assert report["compressed"]["params"] < report["baseline"]["params"]


def test_uniform_pruning_loads_with_plain_transformers(tiny_llama: Path, tmp_path: Path) -> None:
    recipe = {"steps": [
        {"method": "heads", "sparsity": 0.5, "score": "magnitude", "gqa": "within"},
        {"method": "neurons", "sparsity": 0.25, "score": "magnitude"},
    ]}
    out = tmp_path / "out"
    slimformer.compress(tiny_llama, recipe, eval=FAST_EVAL, output=out, progress=False)
    ours = slimformer.load(out)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.intermediate_size) == (4, 2, 48)
    torch.testing.assert_close(_logits(plain), _logits(ours), atol=1e-6, rtol=1e-6)


def test_pruned_then_quantized_round_trip(tmp_path: Path) -> None:
    from slimformer.artifact import load_artifact, save_artifact
    from slimformer.prune.structured import HeadsConfig, NeuronsConfig, heads, neurons
    from slimformer.quant.rtn import RTNConfig, rtn

    model = make_tiny_llama(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=8,
                            max_position_embeddings=128)
    heads(model, HeadsConfig(sparsity=0.3, score="magnitude", scope="global"))
    neurons(model, NeuronsConfig(sparsity=0.4, score="magnitude", scope="global", multiple_of=4))
    rtn(model, RTNConfig(bits=4, group_size=16))  # QuantLinear modules of the pruned sizes
    save_artifact(model, tmp_path, kind="decoder")
    loaded, _ = load_artifact(tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)
