"""GGUF export of the real SmolLM2: what llama.cpp's converter writes, with OUR codes in GGML blocks,
read back by readers that are not slimformer (gguf-py, and transformers' GGUF loader in a process
that cannot import it). Tiny architectures, tokenizers and refusals: test_gguf_tiny.py."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as ggml_dequantize
from torch import nn

from gguf_reader import (  # tests/export/gguf_reader.py
    cosine, eval_windows, gguf_fields, llama_cpp_scores, open_llama_cpp, our_weights, read_independently,
    reference_gguf,
)

from slimformer.data.sources import load_data
from slimformer.export.gguf import export_gguf
from slimformer.export.gguf_blocks import offsets_fp16, pack_blocks, per_block
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn


# --- the real SmolLM2 ---

def test_smollm2_float_export_is_what_llama_cpp_wrote(smollm_bundle, tmp_path) -> None:
    """The built-in model is the dequantized Q4_1 file llama.cpp wrote; exported as F32 it must give
    back that file's tensors exactly (names, q/k row layout), and the same tokenizer metadata."""
    info = export_gguf(smollm_bundle.model, smollm_bundle.tokenizer, tmp_path / "f32.gguf")
    assert info["tensors"] == {"F32": 272} and info["layers_from_codes"] == 0 and info["warnings"] == []
    ours, ref = gguf.GGUFReader(tmp_path / "f32.gguf"), gguf.GGUFReader(reference_gguf())
    theirs = {t.name: t for t in ref.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs)  # no `output`: the embedding is tied
    for t in ours.tensors:
        want = ggml_dequantize(theirs[t.name].data, theirs[t.name].tensor_type)
        assert np.array_equal(np.asarray(t.data), want), t.name
    mine, llama_cpp = gguf_fields(tmp_path / "f32.gguf"), gguf_fields(reference_gguf())
    same = [k for k in llama_cpp if not k.startswith("general.") or k in ("general.architecture",
                                                                          "general.quantization_version")]
    assert {k: mine[k] for k in same} == {k: llama_cpp[k] for k in same}  # tokens, merges, pre "smollm", ...
    assert mine["tokenizer.ggml.pre"] == "smollm" and mine["general.file_type"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["f32.gguf"]  # no temporary sibling left


SCHEMES = [  # (bits, group_size, symmetric, ggml type, llama.cpp file type)
    pytest.param((4, 32, True, "Q4_0", 2), id="sym4-g32-Q4_0", marks=pytest.mark.slow),
    pytest.param((4, 64, False, "Q4_1", 3), id="asym4-g64-Q4_1"),
    pytest.param((8, 32, True, "Q8_0", 7), id="sym8-g32-Q8_0", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def windows(smollm_bundle) -> torch.Tensor:
    return eval_windows(smollm_bundle.tokenizer)  # (2, 128)


@pytest.fixture(scope="module")
def float_logits(smollm_bundle, windows) -> torch.Tensor:
    with torch.inference_mode():
        return smollm_bundle.model(input_ids=windows).logits.float()  # (2, 128, V)


@pytest.fixture(scope="module", params=SCHEMES)
def smollm2_gguf(request, smollm_bundle, tmp_path_factory, windows):
    """SmolLM2 quantized by slimformer's RTN and exported (F16 token_embd): (model, path, info, scheme,
    our logits on `windows` with the embedding rounded to fp16 as in the file)."""
    bits, group_size, symmetric, kind, file_type = request.param
    model = copy.deepcopy(smollm_bundle.model)
    rtn(model, RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    path = tmp_path_factory.mktemp(kind) / "smollm2.gguf"
    info = export_gguf(model, smollm_bundle.tokenizer, path, unquantized="f16")
    with torch.inference_mode():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()
        logits = model(input_ids=windows).logits.float()
    yield model, path, info, request.param, logits
    path.unlink()


def test_smollm2_codes_carried_into_blocks(smollm2_gguf, smollm_bundle, windows, float_logits) -> None:
    model, path, info, (bits, group_size, symmetric, kind, file_type), ours = smollm2_gguf
    assert info["tensors"] == {kind: 210, "F16": 1, "F32": 61} and info["layers_from_codes"] == 210
    texts = load_data("lee-news", "eval").texts[:20] if kind == "Q4_0" else None
    got = read_independently(path, weights=our_weights(model), ids=windows, texts=texts)
    assert got["file_type"] == file_type and got["quantization_version"] == 2
    stats = got["weights"][kind]
    assert stats["tensors"] == 210 and stats["over_bound"] == 0
    if symmetric:
        assert stats["exact"] == 210 and stats["max_abs"] == 0.0  # bit-exact fp32 weights
    else:
        assert 0 < stats["max_abs"] <= info["max_offset_rounding"]  # only m's fp16 rounding
    cos, err = cosine(got["logits"], ours), float((got["logits"] - ours).abs().max())
    print(f"\n{kind}: {info['bytes']} bytes in {info['seconds']} s; weights max |err| {stats['max_abs']:.3g} "
          f"(max offset rounding {info['max_offset_rounding']:.3g}); transformers logits vs ours: cosine {cos:.10f}, "
          f"max |err| {err:.3g}; vs the unquantized model: cosine {cosine(got['logits'], float_logits):.6f}")
    assert got["model_class"] == "LlamaForCausalLM" and cos >= 0.9999
    if symmetric:
        assert err <= 1e-3  # the same weights: only summation order may differ
    if texts is not None:
        assert got["ids"] == [smollm_bundle.tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.llamacpp
def test_llama_cpp_runs_smollm2_blocks(smollm2_gguf, smollm_bundle, windows) -> None:
    """llama.cpp itself: our blocks, q/k layout and tokenizer metadata. It multiplies Q4/Q5/Q8 weights by
    activations rounded to 8 bits per block of 32, so logits match to a cosine, not bit for bit (its own
    Q4_1 file of this model measures 0.99962 against torch, tests/evaluate/test_llamacpp.py)."""
    _, path, _, (_, _, _, kind, _), ours = smollm2_gguf
    llm = open_llama_cpp(path)
    try:
        got = llama_cpp_scores(llm, windows)
        texts = load_data("lee-news", "eval").texts[:20]
        tokens = [[int(i) for i in llm.tokenize(t.encode(), add_bos=False, special=True)] for t in texts]
    finally:
        llm.close()
    cos, agree = cosine(got, ours), float((got.argmax(-1) == ours.argmax(-1)).float().mean())
    print(f"\nllama.cpp {kind} vs slimformer: cosine {cos:.6f}, max |err| {float((got - ours).abs().max()):.3f}, "
          f"top-1 agreement {agree:.3f}")
    assert cos >= 0.999
    assert tokens == [smollm_bundle.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_pruned_smollm2_weights_in_blocks(smollm_bundle) -> None:
    """Pruned weights (50% smallest |w| of a real layer) stay exactly zero in Q4_0; in Q4_1 they read
    m + d * zero, zero only where d * zero fits fp16, and never more than ulp_fp16(m) / 2."""
    w = smollm_bundle.model.model.layers[3].mlp.down_proj.weight.detach().clone()  # (576, 1536)
    w[w.abs() < w.abs().median()] = 0
    linear = nn.Linear(1536, 576, bias=False)
    linear.weight.data.copy_(w)
    for symmetric, kind, group in ((True, "Q4_0", 32), (False, "Q4_1", 64)):
        q = QuantLinear.from_float(linear, bits=4, group_size=group, symmetric=symmetric)
        d, z = per_block(q.scale, 1536, group), per_block(q.zero, 1536, group)
        raw = pack_blocks(q.codes, d, kind, None if symmetric else z)
        got = torch.from_numpy(ggml_dequantize(raw, gguf.GGMLQuantizationType[kind]).copy())
        pruned = w == 0
        assert bool((q.dequantized_weight()[pruned] == 0).all())  # slimformer itself: exact zeros
        zeros = float((got[pruned] == 0).float().mean())
        m, err = offsets_fp16(d, z)
        print(f"\n{kind}: {zeros:.4f} of pruned weights exactly 0, max |pruned| {float(got[pruned].abs().max()):.3g}, "
              f"max |dm| {float(err.abs().max()):.3g}")
        if symmetric:
            assert zeros == 1.0
        else:
            assert float(got[pruned].abs().max()) <= float(err.abs().max())
            spacing = torch.from_numpy(np.spacing(np.abs(m.numpy())).astype(np.float32))
            assert bool((err.abs() <= spacing / 2).all())


# --- small models of each architecture ---
