"""compressed-tensors folders: the packing equals compressed-tensors' own, the tensors and
quantization_config are what its compressor writes, and what the format cannot hold is refused. The
real SmolLM2 read back by plain transformers: test_compressed_tensors_smollm.py."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from compressed_tensors.utils.match import match_named_modules
from tiny import tiny_llama  # tests/tiny.py
from torch import nn

from slimformer.errors import UserError
from slimformer.export.compressed_tensors import layer_scheme, layer_tensors, save_compressed_tensors
from slimformer.export.ct_packing import pack_int32, to_signed, unpack_int32
from slimformer.quant.dynamic import DynamicConfig, dynamic
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn

def _llama() -> nn.Module:
    return tiny_llama(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048)


def _layer(bits: int, group_size: int, symmetric: bool, out_f: int = 40, in_f: int = 96, **rule) -> QuantLinear:
    torch.manual_seed(bits)
    return QuantLinear.from_float(nn.Linear(in_f, out_f), bits=bits, group_size=group_size, symmetric=symmetric,
                                  **rule)


def _ct_scheme(scheme) -> QuantizationScheme:
    return QuantizationScheme.model_validate({"targets": ["Linear"], **scheme.quant_args()})


def _nothing_written(tmp_path) -> bool:
    return list(tmp_path.iterdir()) == []


# --- math on tiny tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 32), (5, 70), (33, 13), (40, 576)])
def test_packing_equals_compressed_tensors(bits: int, shape: tuple[int, int]) -> None:
    v = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8,
                      generator=torch.Generator().manual_seed(bits))
    for dim in (0, 1):
        ours = pack_int32(v, bits, dim)
        assert ours.dtype == torch.int32 and torch.equal(ours, pack_to_int32(v, bits, packed_dim=dim))
        assert ours.shape[dim] == -(-shape[dim] * bits // 32)  # 32 values in exactly `bits` words
        assert torch.equal(unpack_int32(ours, bits, shape[dim], dim), v)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), v)


def test_signed_mapping_keeps_q_minus_zero() -> None:
    codes = torch.tensor([[0, 7, 8, 15]], dtype=torch.int16)
    assert to_signed(codes, 4, symmetric=False).tolist() == [[-8, -1, 0, 7]]
    assert to_signed(codes - 8, 4, symmetric=True).tolist() == [[-8, -1, 0, 7]]
    with pytest.raises(ValueError):
        to_signed(torch.tensor([[16]], dtype=torch.int16), 4, symmetric=False)


@pytest.mark.parametrize("bits,group_size,symmetric,rule", [
    (4, 32, True, "absmax"), (3, 32, False, "absmax"), (4, -1, False, "absmax"), (8, 48, False, "absmax"),
    (2, -1, True, "absmax"), (4, 32, True, "signed_max"),  # llama.cpp's Q4_0 rounding: negative scales too
])
def test_layer_tensors_equal_compressed_tensors_compressor(bits: int, group_size: int, symmetric: bool,
                                                            rule: str) -> None:
    """compressed-tensors' own compressor, fed our dequantized weight, scales and zero points, writes the
    very tensors we write; its decompressor gives back our weight bit for bit."""
    layer = _layer(bits, group_size, symmetric, scale_rule=rule)
    scheme = layer_scheme("layer", layer)
    ours = layer_tensors(layer, scheme)
    ct = _ct_scheme(scheme)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    state = {"weight": layer.dequantized_weight(), "weight_scale": layer.scale.float()}
    if not symmetric:
        state["weight_zero_point"] = to_signed(layer.zero, bits, False)
    theirs = compressor.compress(state, ct)
    assert set(theirs) == set(ours)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    back = compressor.decompress(dict(ours), ct)["weight"]
    assert back.dtype == torch.float32 and torch.equal(back, layer.dequantized_weight())


def test_int8_layer_tensors_and_static_zero_point() -> None:
    base = _layer(8, -1, True)
    layer = QuantLinear.from_codes(base.codes, base.qparams(), None, act_bits=8, act_symmetric=False)
    layer.act_scale.fill_(0.05)
    layer.act_zero.fill_(131)  # ours: unsigned 8-bit zero point; theirs: 131 - 128
    scheme = layer_scheme("layer", layer)
    tensors = layer_tensors(layer, scheme)
    assert scheme.format == "int-quantized" and (scheme.act, scheme.act_symmetric) == ("tensor", False)
    assert torch.equal(tensors["weight"], base.codes.to(torch.int8)) and tensors["input_zero_point"].tolist() == [3]
    back = BaseCompressor.get_value_from_registry("int-quantized").decompress(dict(tensors), _ct_scheme(scheme))
    assert torch.equal(back["weight"], base.dequantized_weight())


def test_quantization_config_is_what_compressed_tensors_writes(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=False, targets=["mlp.down_proj"]))
    rtn(model, RTNConfig(bits=3, group_size=-1, symmetric=True, ignore=["mlp.down_proj", "self_attn.o_proj"]))
    info = save_compressed_tensors(model, None, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)  # compressed-tensors' own parser
    dumped = parsed.model_dump()
    assert all(dumped[k] == config[k] for k in dumped if k != "config_groups")
    assert {k: v.model_dump() for k, v in parsed.config_groups.items()} == config["config_groups"]
    assert config["version"] == "0.19.0" and config["quantization_status"] == "compressed"
    assert info["layers_quantized"] == 12 and info["layers_float"][:1] == ["model.layers.0.self_attn.o_proj"]
    # the regex targets and ignore list select exactly the layers of each group, as compressed-tensors matches
    plain = _llama()
    groups = {g["weights"]["num_bits"]: g for g in config["config_groups"].values()}
    assert config["format"] == "pack-quantized" and len(groups) == 2 and groups[3]["weights"]["strategy"] == "channel"
    for bits, names in ((4, ["mlp.down_proj"]), (3, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])):
        got = {n for n, _ in match_named_modules(plain, groups[bits]["targets"], config["ignore"])}
        assert got == {n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(names))
                       and "layers" in n}


# --- refusals: a UserError naming the layer, nothing on disk ----------------------------------------------

def _input_scaled(model: nn.Module) -> nn.Module:
    layer = model.model.layers[0].self_attn.q_proj
    q = QuantLinear.from_float(layer, bits=4, group_size=32, symmetric=True)
    awq = QuantLinear.from_codes(q.codes, q.qparams(), None, input_scaled=True)
    model.model.layers[0].self_attn.q_proj = awq
    return model


def _w4a8(model: nn.Module) -> nn.Module:
    for name in ("q_proj", "k_proj", "v_proj"):
        linear = getattr(model.model.layers[0].self_attn, name)
        q = QuantLinear.from_float(linear, bits=4, group_size=-1, symmetric=True)
        setattr(model.model.layers[0].self_attn, name, QuantLinear.from_codes(q.codes, q.qparams(), None, act_bits=8))
    return model


def _pruned(model: nn.Module) -> nn.Module:
    mlp = model.model.layers[0].mlp  # block 0 keeps 64 of 96 FFN neurons, block 1 all: no config holds both
    mlp.gate_proj, mlp.up_proj = (nn.Linear(64, 64, bias=False) for _ in range(2))
    mlp.down_proj = nn.Linear(64, 64, bias=False)
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=True))
    return model


def _tied_head() -> nn.Module:
    model = tiny_llama(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True)
    rtn(model, RTNConfig(bits=4, group_size=32, targets=["lm_head"]))
    return model


def _nf4(model: nn.Module) -> nn.Module:
    from slimformer.quant.nonlinear import NF4Config, nf4

    nf4(model, NF4Config(targets=["mlp.down_proj"]))
    return model


REFUSALS = {
    "group does not divide the width": (lambda m: rtn(m, RTNConfig(bits=4, group_size=48)) and m,
                                        r"'model\.layers\.0\.self_attn\.q_proj' has 64 inputs, not a multiple of "
                                        r"group_size 48.*e\.g\. 64"),
    "per-tensor weight scale": (lambda m: rtn(m, RTNConfig(bits=4, group_size=0)) and m, "group_size 0"),
    "float minimum (Q4_1 style)": (lambda m: rtn(m, RTNConfig(bits=4, group_size=32, zero_point="float")) and m,
                                   "has a float minimum per group"),
    "AWQ input scale": (_input_scaled, r"'model\.layers\.0\.self_attn\.q_proj' keeps a per-input-channel scale"),
    "lookup table (NF4)": (_nf4, r"'model\.layers\.0\.mlp\.down_proj' is a LUTLinear"),
    "per-tensor dynamic activations": (lambda m: dynamic(m, DynamicConfig(activations="tensor")) and m,
                                       "per token only"),
    "W4A8 static": (_w4a8, r"is W4A8"),
    "q/k/v in different schemes": (lambda m: rtn(m, RTNConfig(bits=4, group_size=32, targets=["q_proj"])) and m,
                                   r"q_proj/k_proj/v_proj of 'model\.layers\.0\.self_attn' differ "
                                   r"\(q_proj: w4 g32 asym; k_proj: float"),
    "non-uniform structural pruning": (_pruned, "non-uniform structure"),
    "quantized lm_head tied to the embeddings": (lambda m: _tied_head(), "'lm_head' is quantized but the config ties"),
    "nothing quantized": (lambda m: m, "no quantized layers"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_write_nothing(case: str, tmp_path) -> None:
    build, message = REFUSALS[case]
    model = build(_llama())
    with pytest.raises(UserError, match=message):
        save_compressed_tensors(model, None, tmp_path / "ct")
    assert _nothing_written(tmp_path)


def test_existing_output_needs_overwrite(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=True))
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "old.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        save_compressed_tensors(model, None, tmp_path / "ct")
    save_compressed_tensors(model, None, tmp_path / "ct", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary or old sibling left
    assert not (tmp_path / "ct" / "old.txt").exists() and (tmp_path / "ct" / "model.safetensors").exists()


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason="transformers 5.24's default (not dequantize) path "
                   "sizes asymmetric zero points unpacked (out, groups); compressed-tensors 0.19 writes them packed "
                   "(ceil(out * bits / 32), groups), as we do, and as vLLM reads them")
def test_upstream_default_path_reads_asymmetric_zero_points(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=False))
    save_compressed_tensors(model, None, tmp_path / "ct")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # how dequantize=True is asked for
@pytest.mark.xfail(strict=True, raises=RuntimeError, reason="transformers 5.24's dequantize=True path applies one "
                   "config group (get_dense_scheme) to every dense layer; the default path matches each layer")
def test_upstream_dequantize_path_reads_two_config_groups(tmp_path) -> None:
    model = _llama()
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=True, targets=["mlp.down_proj"]))
    rtn(model, RTNConfig(bits=8, group_size=-1, symmetric=True, ignore=["mlp.down_proj"]))
    save_compressed_tensors(model, None, tmp_path / "ct")
    config = transformers.CompressedTensorsConfig(dequantize=True)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=config)


def test_smollm_g128_is_refused_with_a_divisor(smollm_bundle) -> None:
    """SmolLM2's 576-wide inputs are 4.5 groups of 128: the format's readers need equal groups."""
    layer = QuantLinear.from_float(smollm_bundle.model.model.layers[0].self_attn.q_proj, bits=4, group_size=128,
                                   symmetric=False)
    with pytest.raises(UserError, match=r"has 576 inputs, not a multiple of group_size 128 \(its last group holds 64\)"
                                        r".*e\.g\. 64"):
        layer_scheme("model.layers.0.self_attn.q_proj", layer)
