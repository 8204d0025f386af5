"""GGUF export of the real Gemma-3 270M (`gemma3-270m`): its 262k-token tokenizer as llama.cpp reads it
(ids equal to Hugging Face's on real text, BOS-first) and llama.cpp's logits against transformers' for
the float file and for RTN W4 g32 `signed_max` written as Q4_0. One export of each, shared."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from gguf import TokenType

from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows
from slimformer.export.gguf import export_gguf
from slimformer.export.gguf_vocab import vocab_metadata
from slimformer.models.loading import ModelBundle, load_bundle
from slimformer.quant.rtn import RTNConfig, rtn

pytestmark = pytest.mark.slow

# measured on these 2 x 128 shakespeare windows (llama.cpp 0.3.36, 2 threads): F32 per-position cosine
# min 0.999999, mean 0.9999999; Q4_0 vs our dequantized model min 0.99426, mean 0.99960 (llama.cpp rounds
# activations to 8 bits per block of 32 before a Q4_0 product, which torch does not)
FLOAT_MIN, FLOAT_MEAN = 0.9999, 0.99999
Q4_MIN, Q4_MEAN = 0.99, 0.999
# text where llama.cpp's and Hugging Face's rules could part: whitespace runs, digits, emoji, control and
# user-defined tokens in raw text, a literal U+2581 (the tokenizer's own space mark)
ODD = ["Hello  world", "a\tb\t\tc", "  leading", "trailing  ", "x   123 456", "1234567890 3.14159", "a  1", "tab\t1",
       "emoji 😀🎉 👍🏽 ok", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>x<eos>",
       "\n\n\nnew\r\nlines", "naïve café ß 日本語", "<unused0> [multimodal] <mask>", "  \n  ", "\u00a0nbsp\u2009thin",
       "<table><tr>", "ok   \n\n 5", "word\u2581 \u2581\u2581x", "\u200bzero width", ""]


@pytest.fixture(scope="module")
def gemma3() -> ModelBundle:
    return load_bundle("gemma3-270m")


@pytest.fixture(scope="module")
def windows(gemma3: ModelBundle) -> torch.Tensor:
    return lm_windows(gemma3.tokenizer, load_data("shakespeare", "eval").joined(), 128, max_windows=2)  # (2, 128)


@pytest.fixture(scope="module")
def float_gguf(gemma3: ModelBundle, tmp_path_factory: pytest.TempPathFactory):
    """The float export (`slimformer export gemma3-270m --format gguf`'s default: F32 weights)."""
    path = tmp_path_factory.mktemp("gemma3") / "gemma3-270m-f32.gguf"
    info = export_gguf(gemma3.model, gemma3.tokenizer, path)
    yield path, info
    path.unlink()


def _llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_gpu_layers=0, verbose=False, **kwargs)


def _llama_cpp_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits for each window (B, T, V), each from an empty cache."""
    n = ids.shape[1]
    llm = _llama(path, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=2, n_threads_batch=2, logits_all=True)
    try:
        out = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(llm.scores[:n].copy()))
        return torch.stack(out)
    finally:
        llm.close()


def _cosines(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Cosine of the two logit vectors at each position, in float64 (float32 sums over 262k logits drift)."""
    return torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)


def _fuzz(tokenizer, n: int = 400, seed: int = 0) -> list[str]:
    """Strings glued from random vocabulary pieces, whitespace runs and the odd bits above."""
    rng = random.Random(seed)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    spaces = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\u00a0", "\u3000", "\r\n", "    "]
    bits = ["😀", "👍🏽", "日本", "0", "12", "345", "<start_of_turn>", "<end_of_turn>", "<unused7>", "<", "\u2581", "…"]

    def piece() -> str:
        r = rng.random()
        return (tokenizer.convert_tokens_to_string([rng.choice(pieces)]) if r < 0.5
                else rng.choice(spaces) if r < 0.75 else rng.choice(bits))
    return ["".join(piece() for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_vocab_types_as_llama_cpp_converter_writes_gemma3(gemma3: ModelBundle) -> None:
    """The converter's Gemma-3 vocabulary: sentencepiece (`llama`) without a space prefix, control tokens
    for <pad>/<eos>/<bos>/<mask> and every <unused…>, 256 byte tokens, user-defined newline runs. <unk> stays
    `UNKNOWN` where the converter writes control (tokenizing is the same; llama.cpp prints it as ▅)."""
    tok = gemma3.tokenizer
    vocab = vocab_metadata(tok, 262144)
    assert (vocab.model, vocab.pre, vocab.add_bos, vocab.add_eos, vocab.add_space_prefix) == ("llama", "default",
                                                                                           True, False, False)
    assert vocab.special_ids == {"bos": 2, "eos": 1, "unk": 3, "pad": 0} and not vocab.warnings
    types = dict(zip(vocab.tokens, vocab.token_types))
    control = [t for t, k in types.items() if k == TokenType.CONTROL]
    assert {"<pad>", "<eos>", "<bos>", "<mask>", "<start_of_turn>", "<end_of_turn>"} <= set(control)
    assert all(types[t] == TokenType.CONTROL for t in types if t.startswith("<unused"))
    assert len(control) == 6248 and types["<unk>"] == TokenType.UNKNOWN
    assert sum(k == TokenType.BYTE for k in vocab.token_types) == 256
    assert types["\n\n"] == types["[multimodal]"] == TokenType.USER_DEFINED
    assert len(vocab.scores) == 262144 and len(vocab.merges) == 514906


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_real_text_like_hugging_face(gemma3: ModelBundle, float_gguf) -> None:
    """Exact ids: 50 lee-news articles, all 32 shakespeare evaluation scenes, odd strings, 400 random ones."""
    tok = gemma3.tokenizer
    texts = (list(load_data("lee-news", "eval").texts[:50]) + list(load_data("shakespeare", "eval").texts)
             + ODD + _fuzz(tok))
    llm = _llama(float_gguf[0], vocab_only=True)
    try:
        got = [[int(i) for i in llm.tokenize(t.encode(), add_bos=False, special=True)] for t in texts]
        with_bos = [int(i) for i in llm.tokenize(texts[0].encode(), add_bos=True, special=True)]
    finally:
        llm.close()
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert sum(map(len, want[:82])) > 60_000  # real text, not a handful of tokens
    assert [i for i, (g, w) in enumerate(zip(got, want)) if g != w] == []
    assert with_bos == tok(texts[0])["input_ids"] and with_bos[0] == tok.bos_token_id == 2


@pytest.mark.llamacpp
def test_llama_cpp_float_logits_match_transformers(gemma3: ModelBundle, float_gguf, windows) -> None:
    path, info = float_gguf
    assert info["tensors"] == {"F32": 236} and windows[:, 0].tolist() == [2, 2]
    with torch.inference_mode():
        want = gemma3.model(input_ids=windows).logits.float()
    cos = _cosines(_llama_cpp_logits(path, windows), want)
    print(f"\nF32 {info['bytes'] / 1e6:.1f} MB: llama.cpp vs transformers per-position cosine min {cos.min():.6f}, "
          f"mean {cos.mean():.7f}")
    assert cos.min() >= FLOAT_MIN and cos.mean() >= FLOAT_MEAN


@pytest.mark.llamacpp
def test_llama_cpp_q4_0_logits_match_dequantized_model(gemma3: ModelBundle, windows, tmp_path) -> None:
    """RTN W4 g32 signed_max: every linear layer's codes go into Q4_0 blocks; the tied embedding is F16."""
    model = copy.deepcopy(gemma3.model)
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=True, scale_rule="signed_max"))
    path = tmp_path / "gemma3-270m-q4_0.gguf"
    info = export_gguf(model, gemma3.tokenizer, path, unquantized="f16")
    assert info["tensors"] == {"Q4_0": 126, "F16": 1, "F32": 109} and info["layers_from_codes"] == 126
    with torch.inference_mode():
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()  # as in the file
        want = model(input_ids=windows).logits.float()
    del model
    cos = _cosines(_llama_cpp_logits(path, windows), want)
    print(f"\nQ4_0 {info['bytes'] / 1e6:.1f} MB: llama.cpp vs dequantized torch per-position cosine min {cos.min():.6f}, "
          f"mean {cos.mean():.6f}")
    assert cos.min() >= Q4_MIN and cos.mean() >= Q4_MEAN
