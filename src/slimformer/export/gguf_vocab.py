"""Tokenizer metadata for GGUF (`tokenizer.ggml.*`), read from a Hugging Face fast tokenizer's
`tokenizer.json`, the way llama.cpp's converter writes it.

- Byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama 3): `tokenizer.ggml.model = "gpt2"`, the
  vocabulary in its byte-level spelling, the merges, and `tokenizer.ggml.pre`, the name llama.cpp
  gives the pre-tokenizer (the regex that splits text before BPE). llama.cpp's converter tells
  pre-tokenizers apart by hashing how they encode a test text; we decide by a small explicit table
  on what `tokenizer.json` states (`PRE_TOKENIZERS`), and fall back to "default" with a warning.
- Sentencepiece-style BPE (`byte_fallback`, `<0xNN>` byte tokens: Llama 2, Mistral):
  `tokenizer.ggml.model = "llama"`, with scores (llama.cpp merges the pair whose result scores
  highest; a token's score is minus the rank of the first merge producing it, which is
  sentencepiece's order) and the merges as well (transformers' GGUF loader reads those).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFWriter, TokenType

from slimformer.errors import UserError

# the regexes of the pre-tokenizers llama.cpp knows by name, as tokenizer.json spells them
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT = re.compile(r"\d")


def _steps(spec: dict) -> list[dict]:
    """The pre-tokenizer's steps, a `Sequence` flattened."""
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [pre])) if pre.get("type") == "Sequence" else ([pre] if pre else [])


def _digits_merge(tokens: list[str]) -> bool:
    """True when some token joins a digit with another character (a merge across a digit)."""
    return any(len(t) > 1 and _DIGIT.search(t) for t in tokens)


def _is_smollm(steps: list[dict], tokens: list[str]) -> bool:
    """SmolLM / StarCoder: single digits split off, then the GPT-2 regex. A plain GPT-2 regex over a
    vocabulary where no token holds a digit beside anything else tokenizes identically (the vocabulary
    of such a tokenizer, e.g. SmolLM2 after a round trip through a GGUF), so it gets the same name,
    as llama.cpp's hash of the encoded test text would give it."""
    kinds = [s.get("type") for s in steps]
    byte_regex = kinds[-1:] == ["ByteLevel"] and steps[-1].get("use_regex", True)
    if kinds == ["Digits", "ByteLevel"]:
        return bool(steps[0].get("individual_digits")) and byte_regex
    return kinds == ["ByteLevel"] and byte_regex and not _digits_merge(tokens)


def _split_regex(steps: list[dict]) -> str | None:
    """The regex of a `Split` + `ByteLevel(use_regex=false)` pre-tokenizer (Llama 3, Qwen2)."""
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"] or steps[1].get("use_regex", True):
        return None
    return (steps[0].get("pattern") or {}).get("Regex")


# llama.cpp pre-tokenizer name -> test on (pre-tokenizer steps, tokens); the first that holds wins
PRE_TOKENIZERS = {
    "llama-bpe": lambda steps, tokens: _split_regex(steps) == LLAMA3_SPLIT,
    "qwen2": lambda steps, tokens: _split_regex(steps) == QWEN2_SPLIT,
    "smollm": _is_smollm,
    "gpt-2": lambda steps, tokens: [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True),
}


@dataclass
class Vocab:
    """Everything `tokenizer.ggml.*` holds, and what could not be matched exactly."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    warnings: list[str] = field(default_factory=list)


def tokenizer_spec(tokenizer: Any) -> dict:
    """The tokenizer's `tokenizer.json` as a dict; UserError for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"GGUF export needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}. "
                        "Save the model folder with its tokenizer.json, or pass a fast tokenizer.")
    return json.loads(backend.to_str())


def ggml_model(spec: dict) -> str:
    """`gpt2` for byte-level BPE, `llama` for sentencepiece-style BPE with byte fallback."""
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model.get("type") == "BPE" and any(s.get("type") == "ByteLevel" for s in _steps(spec)):
        return "gpt2"
    raise UserError(f"GGUF export writes byte-level BPE (GPT-2 style) or sentencepiece-style BPE tokenizers; this "
                    f"one is a {model.get('type')!r} model with pre-tokenizer {[s.get('type') for s in _steps(spec)]}.")


def _merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """tokenizer.json's merges as pairs (older files spell them 'left right')."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"].get("merges") or []]


def _merges(pairs: list[tuple[str, str]]) -> list[str]:
    """'left right' strings; a space inside a part is written as U+0120, as llama.cpp's converter does."""
    return [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in pairs]


def _scores(tokens: list[str], pairs: list[tuple[str, str]]) -> list[float]:
    """Minus the rank of the first merge producing each token; 0 for tokens no merge produces."""
    rank: dict[str, int] = {}
    for i, (left, right) in enumerate(pairs):
        rank.setdefault(left + right, i)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def pre_tokenizer_name(spec: dict, tokens: list[str]) -> str | None:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer (`PRE_TOKENIZERS`), or None."""
    steps = _steps(spec)
    return next((name for name, test in PRE_TOKENIZERS.items() if test(steps, tokens)), None)


def _looks_special(text: str) -> bool:
    """llama.cpp's converter also marks these added tokens as control tokens, special or not: some
    tokenizers (Gemma's `<unused…>`, `<mask>`; DeepSeek-Coder's `<pad>`) leave them unmarked."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>")) or (text.startswith("<unused") and text.endswith(">")))


def _tokens(tokenizer: Any, spec: dict, n_vocab: int, model: str) -> tuple[list[str], list[int]]:
    """Token strings and ggml token types for ids 0 .. n_vocab - 1 (ids the tokenizer lacks: [PADi], unused)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise UserError(f"the tokenizer has token id {max(by_id)}, but the model's embedding has {n_vocab} rows; "
                        "resize the embedding (model.resize_token_embeddings) before exporting.")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    unk = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            text, kind = f"[PAD{i}]", TokenType.UNUSED
        elif model == "llama" and i == unk:
            kind = TokenType.UNKNOWN  # the converter makes a special <unk> control; only token_to_piece tells them apart
        elif model == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = TokenType.BYTE  # even when also an added token: llama.cpp's byte fallback looks these up
        elif i in added:
            kind = TokenType.CONTROL if added[i].get("special") or _looks_special(text) else TokenType.USER_DEFINED
            if kind == TokenType.USER_DEFINED and model == "llama":
                text = text.replace("\u2581", " ")  # llama.cpp matches user-defined tokens in raw text
        else:
            kind = TokenType.NORMAL
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """(add_bos, add_eos) as the tokenizer behaves: does encoding add them around the text?"""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(plain)
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return (extra and bos is not None and with_special[0] == bos,
            extra and eos is not None and with_special[-1] == eos)


def _space_prefix(spec: dict, model: str) -> bool:
    """Whether the tokenizer puts a space (or ▁) before the text."""
    steps = _steps(spec) + [spec.get("normalizer") or {}] + list((spec.get("normalizer") or {}).get("normalizers", []))
    if model == "llama":
        return any((s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") in ("first", "always"))
                   or (s.get("type") == "Prepend" and s.get("prepend") == "\u2581") for s in steps)
    return any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps)


def vocab_metadata(tokenizer: Any, n_vocab: int) -> Vocab:
    """The GGUF tokenizer metadata for `tokenizer`, for a model whose embedding has `n_vocab` rows."""
    spec = tokenizer_spec(tokenizer)
    model = ggml_model(spec)
    tokens, types = _tokens(tokenizer, spec, n_vocab, model)
    pairs = _merge_pairs(spec)
    warnings = []
    if model == "llama":
        pre = "default"  # llama.cpp's sentencepiece tokenizer has no pre-tokenizer regex
    else:
        pre = pre_tokenizer_name(spec, tokens) or "default"
        if pre == "default":
            warnings.append(f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} is not one GGUF export "
                            "knows by name; wrote tokenizer.ggml.pre = 'default', so llama.cpp may split text "
                            "differently from this tokenizer")
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _adds(tokenizer)
    space = _space_prefix(spec, model)
    if space and model == "gpt2":
        warnings.append("the byte-level tokenizer adds a prefix space, which llama.cpp's BPE tokenizer does not")
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(model, pre, tokens, types, _merges(pairs), _scores(tokens, pairs) if model == "llama" else None,
                 {k: int(v) for k, v in special.items() if isinstance(v, int) and 0 <= v < n_vocab},
                 add_bos, add_eos, space, template if isinstance(template, str) else None, warnings)


def write_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    """Add `vocab` to the GGUF metadata under llama.cpp's keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, {"unk": "add_unk_token_id", "pad": "add_pad_token_id"}.get(kind, f"add_{kind}_token_id"))(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
