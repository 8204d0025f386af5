"""llama.cpp (the `llama-cpp-python` binding, `make llamacpp`) as a runtime for .gguf files.

`GgufModel` opens a GGUF file from its path alone (nothing is fetched) and gives what `evaluate` and
`bench` measure for torch and onnxruntime, the same way:
- `tokenize`: llama.cpp's own tokenizer, built from the file's metadata, so a GGUF evaluates alone;
- `logits` / `perplexity`: every window from an empty key/value cache, mean next-token NLL over
  positions 1..T-1, as `slimformer.evaluate.perplexity` defines it;
- `time_forward` (1 x seq, logits of every position, no cache kept) and `time_decoding`: prefill of
  1 x `prefill` tokens, then one token per step on that cache; medians after warm-up, threads stated.
`evaluate_gguf` and `bench_gguf` are the whole jobs behind `slimformer evaluate/bench FILE.gguf`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from slimformer.errors import UserError

GGUF_MAGIC = b"GGUF"
RUNTIME = "llama.cpp"
INSTALL_HINT = "run `make llamacpp` to build and install llama-cpp-python into .venv"


def check_gguf(path: str | Path) -> Path:
    """`path` as a Path if it is a file starting with the GGUF magic; UserError saying what was found."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"GGUF file '{path}' does not exist.")
    if not path.is_file():
        raise UserError(f"'{path}' is not a file: expected a .gguf model file.")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise UserError(f"'{path}' is not a GGUF file: it starts with {head!r}, expected {GGUF_MAGIC!r}.")
    return path


def import_llama_cpp() -> Any:
    """The `llama_cpp` module, or a UserError that says how to install it."""
    try:
        import llama_cpp
    except ModuleNotFoundError as exc:
        raise UserError(f"llama.cpp runtime: the `llama_cpp` package is not installed ({exc}); "
                        f"{INSTALL_HINT}.") from None
    except (ImportError, OSError, RuntimeError) as exc:  # installed, but its shared library does not load
        raise UserError(f"llama.cpp runtime: `llama_cpp` is installed but cannot be imported "
                        f"({type(exc).__name__}: {str(exc)[:200]}); {INSTALL_HINT} again.") from None
    return llama_cpp


def open_llama(path: str | Path, *, threads: int, n_ctx: int, logits_all: bool) -> Any:
    """A `llama_cpp.Llama` on the local file `path` (checked first): `threads` for prompt and decode,
    one batch of up to `n_ctx` tokens; `logits_all` keeps the logits of every position."""
    path = check_gguf(path)
    llama_cpp = import_llama_cpp()
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False)
    except (ValueError, RuntimeError) as exc:  # llama.cpp's failures arrive as "Failed to load model ..."
        raise UserError(f"llama.cpp cannot load '{path}': {str(exc)[:300]}") from None


class GgufTokenizer:
    """llama.cpp's tokenizer behind the call `lm_windows` makes of a Hugging Face tokenizer:
    tokenizer(text, add_special_tokens=...) -> {"input_ids": [...]}, and `bos_token_id`."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    @property
    def bos_token_id(self) -> int | None:
        bos = int(self.llm.token_bos())
        return bos if bos >= 0 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS only where the GGUF says to add one.
        Special-token text such as "<|im_start|>" is read as that token, as Hugging Face does."""
        return [int(i) for i in self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)]

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}


def _random_ids(vocab: int, n: int, seed: int) -> list[int]:
    # the same ids as bench's torch and onnxruntime inputs (randint, manual_seed)
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))[0].tolist()


class GgufModel:
    """One .gguf file in llama.cpp on `threads` CPU threads (default: torch's), `n_ctx` tokens per
    window. Close it (or use it as a context manager) to free llama.cpp's memory at once."""

    def __init__(self, path: str | Path, *, threads: int | None = None, n_ctx: int = 512) -> None:
        if threads is not None and threads < 1:
            raise UserError(f"threads must be a positive integer, got {threads}.")
        if n_ctx < 2:
            raise UserError(f"n_ctx must be at least 2 tokens, got {n_ctx}.")
        self.path = check_gguf(path)
        self.threads = threads or torch.get_num_threads()
        self.n_ctx = n_ctx
        self.llm = open_llama(self.path, threads=self.threads, n_ctx=n_ctx, logits_all=True)
        self.tokenizer = GgufTokenizer(self.llm)
        self.vocab = int(self.llm.n_vocab())

    def __enter__(self) -> GgufModel:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.llm.close()

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids of `text`, no BOS or other special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def logits(self, ids: Tensor | list[int]) -> Tensor:
        """Logits `(T, V)` float32 of one sequence of token ids `(T,)`, from an empty cache."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        if not 1 <= len(ids) <= self.n_ctx:
            raise UserError(f"llama.cpp window: expected 1..{self.n_ctx} tokens (n_ctx), found {len(ids)}.")
        if max(ids) >= self.vocab or min(ids) < 0:
            raise UserError(f"token ids must lie in [0, {self.vocab}) for '{self.path.name}', found "
                            f"{min(ids)}..{max(ids)}.")
        self.llm.reset()  # n_tokens = 0: eval() then drops every cached position before decoding
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())  # (T, V)

    def perplexity(self, windows: Tensor, progress: bool = True) -> dict[str, Any]:
        """exp(mean NLL) of every next token in `windows` `(n, T)`, each window from an empty cache;
        position 0 is context only. Keys as `perplexity.perplexity` plus runtime and threads."""
        if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
            raise UserError(f"perplexity windows: expected a (n >= 1, seq_len >= 2) tensor, found shape "
                            f"{tuple(windows.shape)}")
        n, seq_len = windows.shape
        nll = torch.zeros((), dtype=torch.float64)
        for window in tqdm(windows.long(), desc="perplexity (llama.cpp)", disable=not progress, unit="window"):
            logits = self.logits(window)  # (T, V)
            nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").double()
        tokens = n * (seq_len - 1)
        nll_sum = float(nll)
        return {"ppl": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens, "windows": n,
                "runtime": RUNTIME, "threads": self.threads}

    def time_forward(self, seq: int = 128, runs: int = 20, warmup: int = 3) -> dict[str, float]:
        """One 1 x `seq` forward from an empty cache with the logits of every position (what a
        torch forward without cache computes); `latency_stats` keys."""
        from slimformer.evaluate.bench import latency_stats
        from slimformer.evaluate.latency import time_calls

        ids = _random_ids(self.vocab, seq, seed=0)
        return latency_stats(time_calls(lambda: self.logits(ids), runs, warmup), seq)

    def time_decoding(self, prefill: int = 512, runs: int = 20, warmup: int = 3) -> dict[str, Any]:
        """Prefill 1 x `prefill` tokens from an empty cache, then one token per step on that cache,
        as generation does: only the last position's logits are computed. A context of its own
        (`prefill + warmup + runs` tokens); {"prefill", "decode"} as `bench` reports them."""
        from slimformer.evaluate.bench import latency_stats
        from slimformer.evaluate.latency import time_calls

        if prefill < 1:
            raise UserError(f"prefill must be a positive number of tokens, got {prefill}.")
        llm = open_llama(self.path, threads=self.threads, n_ctx=prefill + warmup + runs, logits_all=False)
        try:
            ids = _random_ids(self.vocab, prefill, seed=0)

            def prefill_once() -> None:
                llm.reset()
                llm.eval(ids)

            prefill_stats = latency_stats(time_calls(prefill_once, runs, warmup), prefill)
            prefill_once()
            steps = iter(_random_ids(self.vocab, warmup + runs, seed=1))
            decode = latency_stats(time_calls(lambda: llm.eval([next(steps)]), runs, warmup), 1)
        finally:
            llm.close()
        return {"prefill": {**prefill_stats, "logits": "last position"}, "decode": {**decode, "context": prefill}}


def gguf_params(path: str | Path) -> int:
    """Parameters stored in the GGUF file (each tensor's elements; a tied output is stored once)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors))


def evaluate_gguf(path: str | Path, settings: Any) -> dict[str, Any]:
    """`slimformer evaluate FILE.gguf`: perplexity on the evaluation text tokenized by the file's own
    tokenizer (windows cut as for torch), forward latency, size. `settings` is an `EvalSettings`.
    Returns {"model", "eval_data", "runtime", "metrics"} with metric keys as `measure` writes them.

    llama.cpp's tokenizer differs from Hugging Face's on a run of 2+ whitespace characters before a
    digit (SmolLM2: "the  50" is one "  " token in llama.cpp, two " " in HF): on lee-news its own
    windows hold 2 tokens fewer and differ from torch's from window 41 of 74 on. For exactly torch's
    windows, tokenize with the HF tokenizer and pass the windows to `measure_gguf`."""
    from slimformer.data.sources import load_data
    from slimformer.evaluate.measure import DEFAULT_EVAL

    spec = settings.data or DEFAULT_EVAL["decoder"]
    text = load_data(spec, "eval").joined()
    return {"model": str(path), "eval_data": spec, "runtime": RUNTIME, "metrics": measure_gguf(path, text, settings)}


def measure_gguf(path: str | Path, text_or_windows: str | Tensor, settings: Any) -> dict[str, Any]:
    """The metrics `measure` gives a torch model, for a GGUF file in llama.cpp: perplexity on `text`
    (cut into windows by the file's own tokenizer) or on given token windows (n, T), forward latency,
    decode after a `settings.decode_context`-token prompt, size, peak RSS."""
    from slimformer.data.windows import lm_windows
    from slimformer.evaluate.measure import peak_rss_bytes

    start = time.perf_counter()
    context = settings.decode_context
    with GgufModel(path, threads=settings.threads, n_ctx=max(settings.seq_len, settings.latency_seq)) as model:
        windows = (lm_windows(model.tokenizer, text_or_windows, settings.seq_len, settings.max_windows)
                   if isinstance(text_or_windows, str) else text_or_windows)
        metrics: dict[str, Any] = {"params": gguf_params(model.path)}
        metrics.update(model.perplexity(windows, progress=settings.progress))
        if settings.latency:
            if settings.latency_batch != 1:
                raise UserError(f"llama.cpp latency: batch 1 only, got latency_batch={settings.latency_batch}.")
            f = model.time_forward(settings.latency_seq, runs=settings.latency_runs)
            metrics.update({"latency_ms": f["median_ms"], "latency_min_ms": f["min_ms"], "latency_max_ms": f["max_ms"],
                            "latency_batch": 1, "latency_seq": settings.latency_seq, "latency_threads": model.threads,
                            "latency_runs": settings.latency_runs})
            if context:
                d = model.time_decoding(context, runs=16)["decode"]
                metrics.update({"decode_ms": d["median_ms"], "decode_min_ms": d["min_ms"], "decode_max_ms": d["max_ms"],
                                "decode_context": context, "decode_runs": d["runs"]})
        metrics["size_bytes"] = model.size_bytes
    metrics["eval_wall_s"] = round(time.perf_counter() - start, 2)
    metrics["peak_rss_bytes"] = peak_rss_bytes()
    return metrics


def bench_gguf(path: str | Path, settings: Any) -> dict[str, Any]:
    """`slimformer bench FILE.gguf`: one result in `bench_target`'s shape (model, runtime, kind,
    size_bytes, forward, prefill, decode, threads) for a `BenchSettings`; batch 1 only."""
    if settings.batch != 1:
        raise UserError(f"llama.cpp runtime: --batch 1 only (one sequence per call), got --batch {settings.batch}.")
    with GgufModel(path, threads=settings.threads, n_ctx=settings.seq) as model:
        result: dict[str, Any] = {"model": str(path), "runtime": RUNTIME, "kind": "decoder",
                                  "size_bytes": model.size_bytes,
                                  "forward": model.time_forward(settings.seq, settings.runs, settings.warmup)}
        if settings.prefill:
            result.update(model.time_decoding(settings.prefill, settings.runs, settings.warmup))
        result["threads"] = model.threads
    return result
