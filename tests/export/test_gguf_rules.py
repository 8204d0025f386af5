"""llama.cpp's own parametrizations (rtn scale_rule signed_max, zero_point float) go into GGUF blocks
exactly: the file's weights, read back by gguf-py, equal our dequantized weights bit for bit."""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tiny import tiny_llama  # tests/tiny.py

from slimformer.export.gguf import export_gguf
from slimformer.quant.rtn import RTNConfig, rtn


@pytest.mark.parametrize("bits, rule, gtype", [
    (4, {"symmetric": True, "scale_rule": "signed_max"}, "Q4_0"),
    (4, {"symmetric": False, "zero_point": "float"}, "Q4_1"),
    (5, {"symmetric": True, "scale_rule": "signed_max"}, "Q5_0"),
    (5, {"symmetric": False, "zero_point": "float"}, "Q5_1"),
])
def test_gguf_native_rules_are_exact(tmp_path, smollm_bundle, bits, rule, gtype) -> None:
    model = tiny_llama(vocab_size=smollm_bundle.model.config.vocab_size, hidden_size=64, intermediate_size=128,
                       max_position_embeddings=256)
    rtn(model, RTNConfig(bits=bits, group_size=32, **rule))
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "m.gguf", unquantized="f16")
    assert info["tensors"][gtype] == 14 and info["max_offset_rounding"] == 0.0
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for i, block in enumerate(model.model.layers):  # layers without the rope row permutation
        for name, layer in (("ffn_down", block.mlp.down_proj), ("ffn_up", block.mlp.up_proj),
                            ("attn_output", block.self_attn.o_proj), ("attn_v", block.self_attn.v_proj)):
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type.name == gtype
            got = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(layer.out_features, layer.in_features)
            assert torch.equal(got.float(), layer.dequantized_weight().float()), name
