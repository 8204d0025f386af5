"""One function that measures a model the same way everywhere: `compress` (before and after)
and `evaluate` both call `measure`."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from slimformer.data.sources import TextData, load_data
from slimformer.data.windows import lm_windows
from slimformer.errors import UserError
from slimformer.evaluate.classification import probe
from slimformer.evaluate.embedding import embed, mean_cosine
from slimformer.evaluate.latency import measure_decode, measure_latency
from slimformer.evaluate.perplexity import perplexity
from slimformer.evaluate.size import count_params
from slimformer.layers import emulate_int_mm
from slimformer.models.loading import ModelBundle
from slimformer.models.placement import onloaded, peak_memory

DEFAULT_EVAL = {"decoder": "lee-news", "encoder": "tweets"}
DEFAULT_CALIB = {"decoder": "lee-news", "encoder": "tweets"}


@dataclass
class EvalSettings:
    """How to measure: which data, how many perplexity windows, latency shape."""

    data: str | None = None  # alias or path; None -> the default for the model kind
    max_windows: int | None = None  # perplexity windows (None: all)
    seq_len: int = 512
    latency: bool = True
    latency_batch: int = 1
    latency_seq: int = 128
    latency_runs: int = 20
    decode_context: int = 512  # decoders: per-token decode after a prompt this long (0: not measured)
    threads: int | None = None
    progress: bool = True
    distribution: bool = False  # compress: per-layer weight/activation stats of both models + distribution.png
    distribution_windows: int = 2  # evaluation windows (encoders: 32 texts each) for those stats
    step_metrics: bool = True  # compress, recipes of 2+ steps: measure the model after every step too
    device: Any = None  # torch.device the model is measured on (None: where it is)

    def __post_init__(self) -> None:
        if self.distribution_windows < 1:
            raise UserError(f"distribution_windows must be a positive integer, got {self.distribution_windows}.")


@dataclass
class EvalData:
    """Evaluation inputs prepared once per tokenizer and reused for every model measured."""

    name: str
    windows: torch.Tensor | None = None  # decoder: (n, seq_len) token ids
    texts: tuple[str, ...] = ()  # encoder: texts for embedding cosine
    probe_train: TextData | None = None  # encoder: labelled texts for the linear probe
    probe_test: TextData | None = None
    reference: torch.Tensor | None = field(default=None, repr=False)  # encoder: baseline embeddings


def prepare_eval(bundle: ModelBundle, settings: EvalSettings) -> EvalData:
    """Load and tokenize the evaluation data for this model kind (UserError on bad data)."""
    spec = settings.data or DEFAULT_EVAL[bundle.kind]
    data = load_data(spec, "eval")
    if bundle.kind == "decoder":
        return EvalData(spec, windows=lm_windows(bundle.tokenizer, data.joined(), settings.seq_len, settings.max_windows))
    train, test = _probe_splits(spec, data)
    return EvalData(spec, texts=data.texts[:1000], probe_train=train, probe_test=test)


def _probe_splits(spec: str, data: TextData) -> tuple[TextData | None, TextData | None]:
    if data.labels is None:
        return None, None
    if spec == "tweets":
        return load_data(spec, "train"), load_data(spec, "test")
    # a user's labelled file: a fixed 2/3 - 1/3 split (seed 0)
    order = list(range(len(data.texts)))
    random.Random(0).shuffle(order)
    cut = (2 * len(order)) // 3
    pick = lambda idx: TextData(data.name, tuple(data.texts[i] for i in idx), tuple(data.labels[i] for i in idx))  # noqa: E731
    return pick(order[:cut]), pick(order[cut:])


def measure(bundle: ModelBundle, data: EvalData, settings: EvalSettings) -> dict[str, Any]:
    """Quality, size and speed metrics of one model on prepared data (on `settings.device`: the
    model moves there for the measurement and back)."""
    with onloaded(bundle.model, settings.device):
        return _measure(bundle, data, settings)


def _measure(bundle: ModelBundle, data: EvalData, settings: EvalSettings) -> dict[str, Any]:
    start = time.perf_counter()
    model = bundle.model.eval()
    metrics: dict[str, Any] = {**count_params(model)}
    # quality: _int_mm layers as their exact fp32 form (same numbers; see emulate_int_mm)
    with emulate_int_mm(model) as emulated:
        if bundle.kind == "decoder":
            metrics.update(perplexity(model, data.windows, progress=settings.progress))
        else:
            metrics.update(_encoder_quality(bundle, data, settings))
    if emulated:
        metrics["quality_int_mm_emulated_layers"] = emulated
    if settings.latency:
        vocab = bundle.model.config.vocab_size
        metrics.update(
            measure_latency(model, vocab, batch=settings.latency_batch, seq=settings.latency_seq,
                            runs=settings.latency_runs, threads=settings.threads)
        )
        if bundle.kind == "decoder" and settings.decode_context:
            metrics.update(measure_decode(model, vocab, context=settings.decode_context, threads=settings.threads))
    metrics["eval_wall_s"] = round(time.perf_counter() - start, 2)
    metrics["peak_rss_bytes"] = peak_rss_bytes()
    return metrics


def _encoder_quality(bundle: ModelBundle, data: EvalData, settings: EvalSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    emb = embed(bundle.model, bundle.tokenizer, list(data.texts), progress=settings.progress)
    if data.reference is None:
        data.reference = emb  # the first model measured (the baseline) is the reference
    out["cosine"] = mean_cosine(emb, data.reference)
    if data.probe_train is not None:
        train_x = embed(bundle.model, bundle.tokenizer, list(data.probe_train.texts), progress=settings.progress)
        test_x = embed(bundle.model, bundle.tokenizer, list(data.probe_test.texts), progress=settings.progress)
        out.update(probe(train_x, list(data.probe_train.labels), test_x, list(data.probe_test.labels)))
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return int(peak_memory()["peak_rss_bytes"])
