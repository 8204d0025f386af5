"""GGUF export of the decoder families beyond Llama/Qwen2 (Qwen3, Gemma, Gemma-2, Gemma-3, Phi-3) and of
Llama-3 / linear rope scaling, on tiny random models built from their transformers configs: gguf-py's
own tensor-name map and dequantize read the weights back, llama.cpp itself runs the file."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from small_vocab import llama_cpp_logits, small_bpe, windows

from slimformer.errors import UserError
from slimformer.export.gguf import export_gguf
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn

VOCAB = 1024
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
GEMMA_QK = dict(head_dim=16, query_pre_attn_scalar=16)
# name -> (config class, config overrides, GGUF arch)
CASES = {
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32), "qwen3"),  # head_dim 32 != 64 / 4
    "gemma": (transformers.GemmaConfig, dict(head_dim=16), "gemma"),
    # softcaps small enough to bend these logits (Gemma-2's own 50 / 30 leave a tiny model's untouched)
    "gemma2": (transformers.Gemma2Config, dict(GEMMA_QK, sliding_window=8, attn_logit_softcapping=2.0,
                                               final_logit_softcapping=3.0), "gemma2"),
    "gemma3": (transformers.Gemma3TextConfig, dict(GEMMA_QK, sliding_window=8, sliding_window_pattern=2,
                                                   rope_scaling={"rope_type": "linear", "factor": 4.0}), "gemma3"),
    "phi3": (transformers.Phi3Config, dict(partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=0,
                                           eos_token_id=0), "phi3"),
    "llama3": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 16}), "llama"),
}
# HF models that differ from the case only in what the file's metadata (not its tensors) must carry: llama.cpp's
# logits must be far from each of them, so that a cosine over the threshold means the key was read
CONTROLS = {
    "gemma": [{"norms_minus_one": True}],  # what llama.cpp would compute from norms written without + 1
    "gemma2": [dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None), dict(sliding_window=4096)],
    "gemma3": [dict(rope_scaling=None), dict(sliding_window_pattern=6), dict(rope_local_base_freq=1e6)],
    "phi3": [dict(partial_rotary_factor=1.0)],
    "llama3": [dict(rope_scaling=None)],
}
LLAMA_CPP_MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return small_bpe(VOCAB, slice(20, 300), split_digits=True)


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return windows(tokenizer)  # (2, 64)


def _build(case: str, **overrides) -> transformers.PreTrainedModel:
    """The case's tiny model (the same weights for any overrides that add no parameter), attention as 4-bit
    symmetric g32 codes (Q4_0), MLP as 8-bit symmetric per channel (Q8_0)."""
    cls, extra, _ = CASES[case]
    minus_one = overrides.pop("norms_minus_one", False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, **{**extra, **overrides})).eval()
    model.config._name_or_path = f"tiny-{case}"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # larger than the 0.02 init, so logits differ visibly between tokens
                p.mul_(5)
            else:  # norms away from their init, so that w and 1 + w differ per channel
                p.add_(0.1 * torch.randn_like(p) - (1.0 if minus_one else 0.0))
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=True, targets=("re:self_attn",)))
    rtn(model, RTNConfig(bits=8, group_size=-1, symmetric=True, targets=("re:mlp",)))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tokenizer, tmp_path_factory):
    model = _build(request.param)
    path = tmp_path_factory.mktemp(request.param) / "m.gguf"
    info = export_gguf(model, tokenizer, path)
    return request.param, model, path, info, gguf.GGUFReader(path)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for arch llama (as transformers' GGUF loader does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def test_tensors_read_back_by_gguf_py(exported) -> None:
    """gguf-py's own HF -> GGUF name map names every tensor; its dequantize gives our weights bit for bit;
    norms are w (Gemma: 1 + w, what HF multiplies by), F32."""
    case, model, path, info, reader = exported
    arch = CASES[case][2]
    assert reader.fields["general.architecture"].contents() == arch
    tensors = {t.name: t for t in reader.tensors}
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + suffix for t in gguf.MODEL_TENSORS[enum] for i in range(2)
               for suffix in (".weight", ".bias")}
    assert set(tensors) <= allowed
    names = gguf.get_tensor_name_map(enum, 2)
    shift = 1.0 if arch.startswith("gemma") else 0.0
    heads = {"attn_q": 4, "attn_k": 2}
    seen = {"rope_freqs.weight"} & set(tensors)
    for key, value in model.state_dict().items():
        module = model.get_submodule(key.rpartition(".")[0])
        if key == "lm_head.weight" and model.lm_head.weight is model.model.embed_tokens.weight:
            continue  # tied: llama.cpp reads token_embd
        if isinstance(module, QuantLinear):
            if not key.endswith(".codes"):
                continue
            key, want = key.replace(".codes", ".weight"), module.dequantized_weight()
        else:
            want = value.float() + (shift if key.endswith("norm.weight") else 0.0)
        t = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        leaf = t.name.split(".")[-2]
        if arch == "llama" and leaf in heads:
            got = _unpermute(got, heads[leaf])
        assert t.tensor_type.name == ("F32" if want.dim() == 1 or not isinstance(module, QuantLinear)
                                      else ("Q4_0" if "self_attn" in key else "Q8_0")), t.name
        assert np.array_equal(got, want.numpy()), t.name
        seen.add(t.name)
    per_block = 4 if arch == "phi3" else 7  # phi3: qkv, o, gate_up, down
    assert seen == set(tensors) and info["layers_from_codes"] == 2 * per_block


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "tokenizer.ggml.t",
                                                                                   "tokenizer.ggml.m"))}


def test_metadata_llama_cpp_reads(exported) -> None:
    case, model, path, _, reader = exported
    fields = _fields(reader)
    want = {
        "qwen3": {"qwen3.attention.key_length": 32, "qwen3.attention.value_length": 32,
                  "qwen3.rope.dimension_count": 32},
        "gemma": {"gemma.attention.key_length": 16, "gemma.rope.dimension_count": 16},
        "gemma2": {"gemma2.attn_logit_softcapping": 2.0, "gemma2.final_logit_softcapping": 3.0,
                   "gemma2.attention.sliding_window": 8},
        "gemma3": {"gemma3.attention.sliding_window": 8, "gemma3.attention.sliding_window_pattern": 2,
                   "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4, "gemma3.rope.scaling.type": "linear",
                   "gemma3.rope.scaling.factor": 4.0},
        "phi3": {"phi3.rope.dimension_count": 8, "phi3.rope.scaling.original_context_length": 4096,
                 "phi3.attention.sliding_window": 0},
        "llama3": {"llama.rope.dimension_count": 16},
    }[case]
    assert {k: fields.get(k) for k in want} == want
    if case == "llama3":  # the divisors transformers itself applies: its default inv_freq over its llama3 one
        config = model.config
        plain = ROPE_INIT_FUNCTIONS["default"] if "default" in ROPE_INIT_FUNCTIONS else None
        scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]
        base = (plain(config, "cpu")[0] if plain else
                1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16)))
        freqs = dequantize(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data,
                           gguf.GGMLQuantizationType.F32)
        assert np.allclose(freqs, (base / scaled).numpy(), rtol=1e-6) and freqs.max() == 8.0


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.double()


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_file(exported, ids) -> None:
    """llama.cpp's graph for the arch on our file gives transformers' logits on real text. It multiplies
    Q4/Q8 weights by activations rounded to 8 bits per block of 32, so the logits agree to a cosine (tiny
    random models measure 0.99983-0.99996 here), not bit for bit; each control (the same weights, one
    metadata-only feature changed) is far below the threshold, so a key llama.cpp ignored would fail."""
    case, model, path, _, _ = exported
    got = llama_cpp_logits(path, ids)
    cos = _cosine(got, _hf_logits(model, ids))
    controls = [_cosine(got, _hf_logits(_build(case, **copy.deepcopy(c)), ids)) for c in CONTROLS.get(case, [])]
    print(f"\n{case}: llama.cpp vs transformers cosine {cos:.6f}; controls {[round(c, 4) for c in controls]}")
    assert cos >= LLAMA_CPP_MIN_COSINE
    assert all(c < LLAMA_CPP_MIN_COSINE for c in controls)


REFUSALS = [
    pytest.param("llama3", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
                 r"rope scaling 'yarn'", id="llama-yarn"),
    pytest.param("qwen3", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
                 r"rope scaling 'llama3'", id="qwen3-llama3"),
    pytest.param("phi3", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
                              original_max_position_embeddings=64),
                 r"LongRoPE \('longrope'\)", id="phi3-longrope"),
    pytest.param("gemma", dict(tie_word_embeddings=False), r"not tied .* llama.cpp's gemma", id="gemma-untied"),
    pytest.param("gemma2", dict(query_pre_attn_scalar=64), r"query_pre_attn_scalar=64.*1/sqrt\(16\)", id="gemma2-scale"),
    pytest.param("gemma2", dict(attn_logit_softcapping=None), r"attn_logit_softcapping=None", id="gemma2-no-softcap"),
    pytest.param("gemma3", dict(layer_types=["full_attention", "sliding_attention"]), r"not llama.cpp's gemma3 pattern",
                 id="gemma3-layer-types"),
]


@pytest.mark.parametrize(("case", "overrides", "message"), REFUSALS)
def test_refusals_write_nothing(tokenizer, tmp_path, case, overrides, message) -> None:
    model = _build(case, **overrides)
    with pytest.raises(UserError, match=message):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_phi3_name_without_phi3_vocabulary_is_renamed(tokenizer, tmp_path) -> None:
    """llama.cpp would fail to load a file named phi3 whose vocabulary lacks </s>, <unk>, <s>."""
    model = _build("phi3")
    model.config._name_or_path = "microsoft/Phi-3-mini-4k-instruct"
    info = export_gguf(model, tokenizer, tmp_path / "p.gguf")
    assert _fields(gguf.GGUFReader(tmp_path / "p.gguf"))["general.name"] == "phi-mini-4k-instruct"
    assert any("llama.cpp keys Phi-3 token attributes" in w for w in info["warnings"])
