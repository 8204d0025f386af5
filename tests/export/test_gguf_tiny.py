"""GGUF export of tiny random models of each family, the tokenizer metadata and every refusal, read
back by readers that are not slimformer (helpers: gguf_reader.py). The real SmolLM2: test_gguf.py."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import quantize as ggml_quantize
from torch import nn

from gguf_reader import (  # tests/export/gguf_reader.py
    LEAVES, NORMS, cosine, eval_windows, gguf_fields, llama_cpp_scores, open_llama_cpp, our_weights,
    read_independently, unpermute_rows,
)

from slimformer.data.sources import load_data
from slimformer.errors import UserError
from slimformer.export.gguf import export_gguf
from slimformer.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name
from slimformer.quant.dynamic import DynamicConfig, dynamic
from slimformer.quant.nonlinear import NF4Config, nf4
from slimformer.quant.qlinear import QuantLinear
from slimformer.quant.rtn import RTNConfig, rtn


def _tiny(arch: str = "llama", *, tie: bool = False, seed: int = 0, vocab: int = 49152) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=256)
    config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config}[arch](**common)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


def test_tiny_llama_untied_f32_exact(smollm_bundle, tmp_path) -> None:
    model = _tiny()
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "t.gguf")
    assert info["tensors"] == {"F32": 2 * 9 + 3}  # 9 per block + token_embd, output_norm, output
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = model.state_dict()
    assert np.array_equal(tensors["output.weight"], state["lm_head.weight"].numpy())
    assert np.array_equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"].numpy())
    assert np.array_equal(tensors["output_norm.weight"], state["model.norm.weight"].numpy())
    for i in range(2):
        for path, leaf in {**LEAVES, **NORMS}.items():
            got = tensors[f"blk.{i}.{leaf}.weight"]
            got = unpermute_rows(got, {"attn_q": 4, "attn_k": 2}[leaf]) if leaf in ("attn_q", "attn_k") else got
            assert np.array_equal(got, state[f"model.layers.{i}.{path}.weight"].numpy()), leaf
    fields = gguf_fields(tmp_path / "t.gguf")
    assert {k: fields[k] for k in ("general.architecture", "llama.block_count", "llama.embedding_length",
                                   "llama.feed_forward_length", "llama.attention.head_count",
                                   "llama.attention.head_count_kv", "llama.rope.dimension_count",
                                   "llama.context_length", "llama.vocab_size")} == {
        "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.context_length": 256, "llama.vocab_size": 49152}


@pytest.mark.parametrize("unquantized", ["f16", "q8_0"])
def test_plain_weights_f16_or_llama_cpp_q8_0(smollm_bundle, tmp_path, unquantized) -> None:
    model = _tiny(tie=True)
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "t.gguf", unquantized=unquantized)
    kind = unquantized.upper()
    assert info["tensors"] == {kind: 2 * 7 + 1, "F32": 2 * 2 + 1}  # norms stay F32; tied: no output
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    w = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    want = w.astype(np.float16) if kind == "F16" else ggml_quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert tensors["blk.1.ffn_up.weight"].tensor_type.name == kind
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_up.weight"].data), want)
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"


def _qwen2_q5() -> nn.Module:
    """A small Qwen2 (q/k/v biases, tied embedding): attention 5-bit symmetric g32, MLP 5-bit asymmetric per channel."""
    model = _tiny("qwen2", tie=True)
    rtn(model, RTNConfig(bits=5, group_size=32, symmetric=True, targets=("re:self_attn",)))
    rtn(model, RTNConfig(bits=5, group_size=-1, symmetric=False, targets=("re:mlp",)))
    return model


def test_qwen2_biases_no_permutation_q5_types(smollm_bundle, tmp_path) -> None:
    model = _qwen2_q5()
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "q.gguf", unquantized="f16")
    assert info["tensors"] == {"Q5_0": 8, "Q5_1": 6, "F16": 1, "F32": 5 + 6} and info["layers_from_codes"] == 14
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    for leaf, path in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
        bias = model.model.layers[0].self_attn.get_submodule(path).bias.detach().numpy()
        assert np.array_equal(np.asarray(tensors[f"blk.0.{leaf}.bias"].data), bias)  # qwen2: rows as they are
    ids = eval_windows(smollm_bundle.tokenizer)[:, :64]
    got = read_independently(tmp_path / "q.gguf", weights=our_weights(model), ids=ids)
    assert got["weights"]["Q5_0"] == {"tensors": 8, "exact": 8, "max_abs": 0.0, "over_bound": 0}
    assert got["weights"]["Q5_1"]["over_bound"] == 0 and got["model_class"] == "Qwen2ForCausalLM"
    assert got["architecture"] == "qwen2"
    with torch.inference_mode():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()
        ref = model(input_ids=ids).logits
    assert cosine(got["logits"], ref) >= 0.9999


def test_mistral_per_channel_q4_0_runs_in_transformers(smollm_bundle, tmp_path) -> None:
    model = _tiny("mistral")
    rtn(model, RTNConfig(bits=4, group_size=-1, symmetric=True))
    info = export_gguf(model, smollm_bundle.tokenizer, tmp_path / "mistral.gguf", unquantized="f16")
    assert info["tensors"] == {"Q4_0": 14, "F16": 2, "F32": 5}
    ids = eval_windows(smollm_bundle.tokenizer)[:, :64]
    got = read_independently(tmp_path / "mistral.gguf", weights=our_weights(model), ids=ids)
    assert got["weights"]["Q4_0"] == {"tensors": 14, "exact": 14, "max_abs": 0.0, "over_bound": 0}
    assert got["architecture"] == "llama"  # llama.cpp's converter writes Mistral as llama
    with torch.inference_mode():
        for emb in (model.model.embed_tokens, model.lm_head):
            emb.weight.data = emb.weight.data.half().float()
        ref = model(input_ids=ids).logits
    assert cosine(got["logits"], ref) >= 0.9999 and float((got["logits"] - ref).abs().max()) <= 1e-3


def _sentencepiece_style_tokenizer():
    """A byte-fallback BPE with ▁ for spaces and <0xNN> byte tokens, the shape of Llama 2 / Mistral's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(load_data("lee-news", "eval").texts[20:300],
                           trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, limit_alphabet=200))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def test_sentencepiece_style_tokenizer_as_llama_model(tmp_path) -> None:
    tok = _sentencepiece_style_tokenizer()
    export_gguf(_tiny(vocab=len(tok)), tok, tmp_path / "spm.gguf")
    fields = gguf_fields(tmp_path / "spm.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    types, tokens, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    assert types[0] == 2 and types[1] == types[2] == 3 and set(types[3:259]) == {6}  # unknown, control, bytes
    first = fields["tokenizer.ggml.merges"][0].replace(" ", "")
    assert scores[tokens.index(first)] == 0.0 and min(scores) == -(len(fields["tokenizer.ggml.merges"]) - 1)
    texts = load_data("lee-news", "eval").texts[:20]
    got = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert [got(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]


def _byte_level(*steps: dict) -> dict:
    return {"pre_tokenizer": steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": list(steps)}}


_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


@pytest.mark.parametrize(("spec", "tokens", "name"), [
    (_byte_level({"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}}, _BYTES_ONLY), ["a"], "qwen2"),
    (_byte_level({"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}}, _BYTES_ONLY), ["a"], "llama-bpe"),
    (_byte_level({"type": "Digits", "individual_digits": True}, _BYTES), ["a"], "smollm"),
    (_byte_level(_BYTES), ["a", "\u01202024"], "gpt-2"),  # a token joining digits: GPT-2's regex
    (_byte_level(_BYTES), ["a", "\u0120a", "1"], "smollm"),  # digits never merge: the two regexes agree
    (_byte_level({"type": "Split", "pattern": {"Regex": r"\w+"}}, _BYTES_ONLY), ["a"], None),
])
def test_pre_tokenizer_table(spec: dict, tokens: list[str], name: str | None) -> None:
    assert pre_tokenizer_name(spec, tokens) == name


def test_unknown_pre_tokenizer_is_default_with_a_warning(smollm_bundle, tmp_path) -> None:
    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(smollm_bundle.tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    info = export_gguf(_tiny(), tok, tmp_path / "t.gguf")
    assert any("tokenizer.ggml.pre = 'default'" in w for w in info["warnings"])
    assert gguf.GGUFReader(tmp_path / "t.gguf").fields["tokenizer.ggml.pre"].contents() == "default"


# --- refusals: a UserError that names the layer, and no file ---

def _awq_layer(model: nn.Module) -> None:
    layer = model.model.layers[1].mlp.up_proj
    q = QuantLinear.from_float(layer, bits=4, group_size=32, symmetric=False)
    scaled = QuantLinear.from_codes(q.codes, q.qparams(), None, input_scaled=True)
    model.model.layers[1].mlp.set_submodule("up_proj", scaled)


def _static_layer(model: nn.Module) -> None:
    layer = model.model.layers[0].self_attn.v_proj
    q = QuantLinear.from_float(layer, bits=8, group_size=-1, symmetric=True)
    model.model.layers[0].self_attn.set_submodule("v_proj", QuantLinear.from_codes(q.codes, q.qparams(), None, act_bits=8))


REFUSALS = [
    pytest.param(lambda m: rtn(m, RTNConfig(bits=3, group_size=32)), r"model\.layers\.0\.self_attn\.q_proj.*3-bit", id="3-bit"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=6, group_size=32, symmetric=True)), r"6-bit symmetric", id="6-bit"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=8, group_size=32, symmetric=False)), r"8-bit asymmetric", id="8-bit-asym"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=4, group_size=48)), r"q_proj' has group_size 48 .*multiple of 32", id="group-48"),
    pytest.param(lambda m: rtn(m, RTNConfig(bits=4, group_size=16)), r"group_size 16", id="group-16"),
    pytest.param(_awq_layer, r"layers\.1\.mlp\.up_proj' has an AWQ input scale.*`fold: true`", id="awq"),
    pytest.param(lambda m: dynamic(m, DynamicConfig()), r"q_proj' quantizes its activations \(dynamic", id="dynamic"),
    pytest.param(_static_layer, r"v_proj' quantizes its activations \(static 8-bit", id="static"),
    pytest.param(lambda m: nf4(m, NF4Config(group_size=32)), r"q_proj' is a LUTLinear", id="nf4"),
]


@pytest.mark.parametrize(("change", "message"), REFUSALS)
def test_refused_layers_write_nothing(smollm_bundle, tmp_path, change, message) -> None:
    model = _tiny(vocab=49152)
    change(model)
    with pytest.raises(UserError, match=message):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refused_architecture_and_arguments(smollm_bundle, tmp_path) -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="this model is GPT2LMHeadModel"):
        export_gguf(gpt2, smollm_bundle.tokenizer, tmp_path / "x.gguf")
    model = _tiny()
    with pytest.raises(UserError, match="unquantized must be one of f32, f16, q8_0"):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "x.gguf", unquantized="q4_0")
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        export_gguf(model, None, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="does not exist"):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "missing" / "x.gguf")
    model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        export_gguf(model, smollm_bundle.tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(smollm_bundle, tmp_path, monkeypatch) -> None:
    def disk_full(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(_tiny(), smollm_bundle.tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llamacpp
def test_llama_cpp_runs_qwen2_and_sentencepiece_vocab(smollm_bundle, tmp_path) -> None:
    """llama.cpp's qwen2 graph on our Q5_0/Q5_1 blocks and biases; its sentencepiece tokenizer
    (merging by our scores) on a byte-fallback vocabulary."""
    model = _qwen2_q5()
    export_gguf(model, smollm_bundle.tokenizer, tmp_path / "qwen2.gguf", unquantized="f16")
    ids = eval_windows(smollm_bundle.tokenizer)[:, :64]
    llm = open_llama_cpp(tmp_path / "qwen2.gguf")
    try:
        got = llama_cpp_scores(llm, ids)
    finally:
        llm.close()
    with torch.inference_mode():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()
        ref = model(input_ids=ids).logits
    print(f"\nllama.cpp qwen2 Q5_0/Q5_1 vs slimformer: cosine {cosine(got, ref):.6f}")
    assert cosine(got, ref) >= 0.999
    tok = _sentencepiece_style_tokenizer()
    export_gguf(_tiny(vocab=len(tok)), tok, tmp_path / "spm.gguf")
    texts = load_data("lee-news", "eval").texts[:20]
    llm = open_llama_cpp(tmp_path / "spm.gguf")
    try:
        tokens = [[int(i) for i in llm.tokenize(t.encode(), add_bos=True, special=True)] for t in texts]
    finally:
        llm.close()
    assert tokens == [tok(t)["input_ids"] for t in texts]  # BOS first, as the tokenizer adds it
