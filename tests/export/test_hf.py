"""Plain Hugging Face folders: loadable by transformers alone, computing what slimformer computes."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig

import pytest
import torch
import transformers
from tiny import tiny_llama  # tests/tiny.py
from torch import nn

from slimformer.api import save_hf
from slimformer.errors import UserError
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn

IDS = torch.arange(3, 27).remainder(64).unsqueeze(0)  # (1, 24)


def _llama() -> nn.Module:
    return tiny_llama(hidden_size=40, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits.float()


# run with -I -S: no PYTHONPATH, no user site, no .pth files (the editable slimformer install is one);
# only the environment's site-packages is put back, so torch and transformers import, slimformer does not
_PLAIN = """
import json, sys
sys.path.append({site!r})
try:
    import slimformer
    print(json.dumps({{"slimformer": True}}))
    sys.exit(0)
except ImportError:
    pass
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({folder!r}).eval()
with torch.inference_mode():
    logits = model(input_ids=torch.tensor({ids})).logits
print(json.dumps({{"slimformer": False, "logits": logits.tolist(), "dtype": str(model.dtype)}}))
"""


def _plain_transformers_logits(folder) -> dict:
    script = _PLAIN.format(site=sysconfig.get_paths()["purelib"], folder=str(folder), ids=IDS.tolist())
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, cwd="/tmp",
                          env={"PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_quantized_model_loads_without_slimformer(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=16))  # 40 = 2 x 16 + 8: a smaller last group too
    info = save_hf(model, tmp_path / "hf")
    assert info["layers_dequantized"] == 14 and info["activation_quantization_dropped"] == []
    assert (tmp_path / "hf" / "model.safetensors").exists() and not (tmp_path / "hf" / "manifest.json").exists()
    result = _plain_transformers_logits(tmp_path / "hf")
    assert result["slimformer"] is False  # the subprocess really could not import slimformer
    got = torch.tensor(result["logits"])
    assert (got - _logits(model)).abs().max().item() < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left behind


def test_float16_folder_is_half_the_size(tmp_path) -> None:
    model = _llama()
    full = save_hf(model, tmp_path / "fp32")
    half = save_hf(model, tmp_path / "fp16", dtype="float16")
    assert half["bytes"] < 0.6 * full["bytes"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp16")
    assert loaded.dtype == torch.float16
    assert torch.nn.functional.cosine_similarity(_logits(loaded).flatten(), _logits(model).flatten(), dim=0) > 0.999


def test_gpt2_conv1d_layers_keep_their_layout(tmp_path) -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                 n_positions=64)).eval()
    rtn(model, RTNConfig(bits=4, group_size=16))
    save_hf(model, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert (_logits(loaded) - _logits(model)).abs().max().item() < 1e-4


def _static_with_input_scales(model: nn.Module) -> nn.Module:
    """SmoothQuant-shaped layers: codes of W * s, x / s quantized with a calibrated scale."""
    torch.manual_seed(3)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            s = torch.rand(module.in_features) + 0.5
            q = QuantLinear.from_float(module, bits=8, group_size=-1, symmetric=True, weight=module.weight * s)
            layer = QuantLinear.from_codes(q.codes, q.qparams(), module.bias, input_scaled=True, act_bits=8)
            layer.input_scale.copy_(s)
            layer.act_scale.fill_(0.02)
            model.set_submodule(name, layer)
    return model


def test_static_activations_dropped_input_scales_folded(tmp_path) -> None:
    model = _static_with_input_scales(_llama())
    info = save_hf(model, tmp_path / "hf")
    assert info["input_scales_folded"] == 14 and len(info["activation_quantization_dropped"]) == 14
    assert any("activation quantization dropped" in w for w in info["warnings"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    layer = model.model.layers[1].mlp.down_proj
    # the folded weight: codes dequantized, divided by the input scale
    assert torch.allclose(loaded.model.layers[1].mlp.down_proj.weight, layer.dequantized_weight(), atol=1e-7)
    cos = torch.nn.functional.cosine_similarity(_logits(loaded).flatten(), _logits(model).flatten(), dim=0)
    assert cos > 0.99  # only the activation rounding differs


def _prune_neurons(model: nn.Module, keep: list[int]) -> None:
    """Keep the first keep[i] FFN neurons of block i (what structured pruning leaves behind)."""
    for block, n in zip(model.model.layers, keep):
        mlp = block.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, n, bias=False)
            new.weight.data.copy_(old.weight.data[:n])
            setattr(mlp, name, new)
        new = nn.Linear(n, mlp.down_proj.out_features, bias=False)
        new.weight.data.copy_(mlp.down_proj.weight.data[:, :n])
        mlp.down_proj = new


def test_uniformly_pruned_model_writes_its_smaller_config(tmp_path) -> None:
    model = _llama()
    _prune_neurons(model, [48, 48])  # uniform sizes, but the config still says 72: the export writes 48
    save_hf(model, tmp_path / "hf")
    assert model.config.intermediate_size == 72  # the caller's model is left as it was
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.intermediate_size == 48
    assert (_logits(loaded) - _logits(model)).abs().max().item() < 1e-5


def test_non_uniform_structure_is_refused(tmp_path) -> None:
    model = _llama()
    _prune_neurons(model, [48, 64])
    with pytest.raises(UserError, match="non-uniform"):
        save_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        save_hf(_llama(), tmp_path / "taken")
    with pytest.raises(UserError, match="dtype"):
        save_hf(_llama(), tmp_path / "x", dtype="int4")
    with pytest.raises(UserError, match="does not exist"):
        save_hf(_llama(), tmp_path / "no" / "x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
