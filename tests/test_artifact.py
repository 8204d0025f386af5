"""Artifact save -> load: same logits, packed/bitmask encodings, real byte savings, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_llama  # tests/tiny.py

from slimformer.api import load
from slimformer.artifact import WEIGHTS, save_artifact
from slimformer.errors import UserError
from slimformer.prune.magnitude import MagnitudeConfig, magnitude
from slimformer.quant.rtn import RTNConfig, rtn


def _tiny(tied: bool = True) -> torch.nn.Module:
    return tiny_llama(hidden_size=40, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, tie_word_embeddings=tied)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(20).remainder(64).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 16, False), (3, -1, True), (8, 0, False)])
def test_quantized_round_trip(tmp_path, bits: int, group_size: int, symmetric: bool) -> None:
    model = _tiny()
    dense_bytes = save_artifact(model, tmp_path, kind="decoder")
    (tmp_path / WEIGHTS).unlink()
    rtn(model, RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    quant_bytes = save_artifact(model, tmp_path, kind="decoder")
    loaded = load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(model))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    enc = manifest["tensors"]["model.layers.0.mlp.up_proj.codes"]
    assert enc["encoding"] == "packed" and enc["bits"] == bits
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    if group_size == 16:  # 40 = 2 x 16 + 8: the smaller last group is recorded
        assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["last_group"] == 8
    # linear weights shrink from 32 bits to `bits` (+ scales); embeddings stay fp32
    assert quant_bytes < dense_bytes



@pytest.mark.parametrize("bits, group_size, rules", [
    (4, 16, {"symmetric": True, "scale_rule": "signed_max"}), (5, -1, {"symmetric": True, "scale_rule": "signed_max"}),
    (4, 16, {"zero_point": "float"}), (5, 0, {"zero_point": "float"}),
])
def test_llama_cpp_rules_round_trip_bit_exactly(tmp_path, bits: int, group_size: int, rules: dict) -> None:
    model = _tiny()
    rtn(model, RTNConfig(bits=bits, group_size=group_size, **rules))
    save_artifact(model, tmp_path, kind="decoder")
    loaded = load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(model))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    name = "model.layers.0.mlp.up_proj"
    spec, tensors = manifest["modules"][name], manifest["tensors"]
    ours, theirs = model.get_submodule(name), loaded.get_submodule(name)
    for leaf in ("codes", "scale", "zero"):
        assert torch.equal(getattr(theirs, leaf).view(torch.int16), getattr(ours, leaf).view(torch.int16))
    # still version 1: an older reader refuses `minimum` (an unexpected tensor) and reads signed_max right
    assert manifest["format_version"] == 1
    if "scale_rule" in rules:
        assert spec["scale_rule"] == "signed_max" and "zero_point" not in spec and theirs.minimum is None
        assert tensors[name + ".codes"]["offset"] == 2 ** (bits - 1)
    else:
        assert spec["zero_point"] == "float" and "scale_rule" not in spec
        assert tensors[name + ".minimum"]["dtype"] == "float16"
        assert torch.equal(theirs.minimum.view(torch.int16), ours.minimum.view(torch.int16))


@pytest.mark.parametrize("rules, encoding", [({"symmetric": True, "scale_rule": "signed_max"}, "packed_bitmask"),
                                             ({"zero_point": "float"}, "packed")])
def test_pruned_then_llama_cpp_rules(tmp_path, rules: dict, encoding: str) -> None:
    """signed_max maps a pruned weight to code 0 = exactly 0 (the bitmask applies); a float minimum
    has no code for 0 (a pruned weight becomes d * round(-m / d) + m), so its codes are stored packed."""
    model = _tiny()
    magnitude(model, MagnitudeConfig(sparsity=0.5))
    rtn(model, RTNConfig(bits=4, group_size=8, **rules))
    w = model.model.layers[0].mlp.gate_proj.dequantized_weight()
    zeros = int((w == 0).sum())
    assert zeros >= w.numel() // 2 if encoding == "packed_bitmask" else zeros < w.numel() // 4
    save_artifact(model, tmp_path, kind="decoder")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tensors"]["model.layers.0.mlp.gate_proj.codes"]["encoding"] == encoding
    assert torch.equal(_logits(load(tmp_path)), _logits(model))


def test_sparse_round_trip_uses_bitmask(tmp_path) -> None:
    model = _tiny(tied=False)
    magnitude(model, MagnitudeConfig(sparsity=0.5))
    save_artifact(model, tmp_path, kind="decoder")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tensors"]["model.layers.1.mlp.down_proj.weight"]["encoding"] == "bitmask"
    assert manifest["tensors"]["lm_head.weight"]["encoding"] == "dense"
    loaded = load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("group_size", [8, 0, -1])
def test_sparse_then_quantized_keeps_zeros(tmp_path, group_size: int) -> None:
    model = _tiny()
    magnitude(model, MagnitudeConfig(sparsity=0.5))
    rtn(model, RTNConfig(bits=4, group_size=group_size, symmetric=False))
    w = model.model.layers[0].mlp.gate_proj.dequantized_weight()
    assert int((w == 0).sum()) >= w.numel() // 2  # the zero point maps 0 to exactly 0
    save_artifact(model, tmp_path, kind="decoder")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    enc = manifest["tensors"]["model.layers.0.mlp.gate_proj.codes"]
    # 1 mask bit + 4 bits for half the weights beats 4 bits for all
    assert enc["encoding"] == "packed_bitmask" and enc["nnz"] <= w.numel() // 2
    assert torch.equal(_logits(load(tmp_path)), _logits(model))


def test_smollm_save_load_same_logits(tmp_path, smollm) -> None:
    rtn(smollm.model, RTNConfig(bits=4, group_size=128))
    size = save_artifact(smollm.model, tmp_path, kind="decoder", tokenizer=smollm.tokenizer)
    assert size == sum((tmp_path / f).stat().st_size for f in (WEIGHTS, "manifest.json", "config.json"))
    # 4-bit linear weights: ~70 MB of the ~540 MB fp32 checkpoint remain (the fp32 embedding dominates)
    assert size < 200e6
    loaded = load(tmp_path)
    ids = torch.arange(1000, 1064).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, smollm.model(input_ids=ids).logits)


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_dynamic_int8_round_trip(tmp_path, activations: str) -> None:
    from slimformer.quant.dynamic import DynamicConfig, dynamic

    model = _tiny()
    dynamic(model, DynamicConfig(activations=activations))
    save_artifact(model, tmp_path, kind="decoder")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert ("act_granularity" in json.dumps(manifest["modules"])) == (activations == "tensor")  # only when not the default
    loaded = load(tmp_path)
    up = loaded.model.layers[0].mlp.up_proj
    assert up.dynamic and up.act_granularity == activations
    assert torch.equal(_logits(loaded), _logits(model))


# --- integrity: checksums of every file, the manifest's own digest, format versions ---


def _saved(tmp_path, **extra):
    model = _tiny()
    rtn(model, RTNConfig(bits=4, group_size=16))
    save_artifact(model, tmp_path, kind="decoder", extra=extra or None)
    return tmp_path


def _rewrite_manifest(folder, **changes) -> None:
    """Edit the manifest and re-seal it, as a future slimformer (or a careful hand) would."""
    from slimformer.artifact import MANIFEST_DIGEST, manifest_digest

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_round_trip(tmp_path) -> None:
    from slimformer.artifact import read_manifest

    recipe = {"steps": [{"method": "rtn", "bits": 4, "group_size": 16}]}
    model = _tiny()
    rtn(model, RTNConfig(bits=4, group_size=16))
    tensors_before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    save_artifact(model, tmp_path, kind="decoder", extra={"recipe": recipe, "source_model": "tiny"})
    manifest = read_manifest(tmp_path)
    assert manifest["recipe"] == recipe and manifest["source_model"] == "tiny"
    assert manifest["format_version"] == 1 and manifest["kind"] == "decoder"
    assert set(manifest["sha256"]) == {"model.safetensors", "config.json"}
    untied = set(tensors_before) - set(manifest["tied"])
    assert set(manifest["tensors"]) == untied
    assert all(tuple(manifest["tensors"][k]["shape"]) == tensors_before[k] for k in untied)
    assert manifest["tensors"]["model.layers.1.self_attn.o_proj.codes"] == {
        "encoding": "packed", "bits": 4, "offset": 0, "shape": [40, 40], "dtype": "int16"}
    assert manifest["modules"]["model.layers.1.mlp.down_proj"]["group_size"] == 16


def test_tokenizer_files_are_checksummed(tmp_path, minilm_bundle) -> None:
    model = _tiny()
    save_artifact(model, tmp_path, kind="decoder", tokenizer=minilm_bundle.tokenizer)
    sums = json.loads((tmp_path / "manifest.json").read_text())["sha256"]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(sums)
    assert all(len(v) == 64 for v in sums.values())


def _flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip_weight", "flip_header", "flip_config", "delete_config"])
def test_damaged_files_are_refused(tmp_path, damage: str) -> None:
    folder = _saved(tmp_path)
    weights = folder / WEIGHTS
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flip_weight":
        _flip_byte(weights, -100)  # inside the tensor data: the file still parses
    elif damage == "flip_header":
        _flip_byte(weights, 20)
    elif damage == "flip_config":
        _flip_byte(folder / "config.json", 40)
    else:
        (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"(corrupted|missing).*re-create"):
        load(folder)


def test_damage_is_caught_without_checksums(tmp_path) -> None:
    """An artifact whose manifest lists no checksum for the weights is refused, never half-loaded."""
    folder = _saved(tmp_path)
    _rewrite_manifest(folder, sha256={})
    with pytest.raises(UserError, match="no sha256"):
        load(folder)


def test_edited_manifest_is_detected(tmp_path) -> None:
    folder = _saved(tmp_path)
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"bits": 4', '"bits": 3', 1))
    with pytest.raises(UserError, match="manifest.json' is corrupted.*re-create"):
        load(folder)
    (folder / "manifest.json").write_text(text[: len(text) // 2])  # truncated JSON
    with pytest.raises(UserError, match="corrupted.*re-create"):
        load(folder)


@pytest.mark.parametrize("version, words", [
    (2, ["version 2", "up to 1", "upgrade"]),
    ("1.0", ["'1.0'", "1 to 1"]),
    (1.5, ["1.5", "1 to 1"]),
    (None, ["None", "1 to 1"]),
    (0, ["version 0", "1 to 1"]),
])
def test_unknown_format_versions_are_refused(tmp_path, version, words: list[str]) -> None:
    folder = _saved(tmp_path)
    _rewrite_manifest(folder, format_version=version)
    with pytest.raises(UserError) as info:
        load(folder)
    assert all(w in str(info.value) for w in words), str(info.value)
