"""Per-layer weight and activation distributions: how heavy-tailed they are, and whether a few
channels dominate (what makes per-tensor activation quantization hard and SmoothQuant useful).

`layer_distributions` runs the model once on a few windows with hooks on the linear layers;
`plot_distributions` draws histograms of a few layers into a PNG (matplotlib's Agg canvas,
created locally: no global backend or pyplot state is touched). `compare_distributions` does both
for the input and the compressed model of a `compress` run (`--distribution`): the stats go into
report.json and report.md, the histograms into distribution.png.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimformer.layers import emulate_int_mm, is_compressed
from slimformer.models.layout import select_linears, weight_view

Stats = dict[str, dict[str, dict[str, float]]]  # {layer: {"weight" | "activation": tensor_stats}}
Histogram = tuple[Tensor, Tensor]  # counts (bins,), edges (bins + 1,)
Histograms = dict[str, dict[str, Histogram]]  # {layer: {"weight" | "activation": histogram}}
ENCODER_TEXTS_PER_WINDOW = 32  # encoders: one "window" of the distribution pass = 32 evaluation texts


def tensor_stats(x: Tensor) -> dict[str, float]:
    """Stats of a (rows, channels) tensor: absmax, std, kurtosis (Pearson: 3 for a normal),
    outlier_ratio (fraction with |x| > 6 std) and channel_ratio (largest channel absmax over the
    median channel absmax; channels = last dimension). Computed in fp32 (PyTorch's cascaded sums
    keep ~7 significant digits; fp64 took 2-4x longer on the 210 layers of SmolLM2)."""
    x = x.detach().float().reshape(-1, x.shape[-1])  # (rows, channels)
    n = x.numel()
    mag = x.abs()
    squares = (x - float(x.sum()) / n).square_()
    var = float(squares.sum()) / n
    std = var**0.5
    channel_absmax = mag.amax(dim=0)  # (channels,)
    median = float(channel_absmax.median())
    return {
        "absmax": float(channel_absmax.max()),
        "std": std,
        "kurtosis": float(squares.square_().sum()) / n / var**2 if var > 0 else 0.0,
        "outlier_ratio": int((mag > 6 * std).sum()) / n,
        "channel_ratio": float(channel_absmax.max()) / median if median > 0 else float("inf"),
    }


@torch.no_grad()
def layer_distributions(
    model: nn.Module, windows: Tensor, targets: tuple[str, ...] = (), keep: Collection[str] = (),
    bins: int = 200, attention_mask: Tensor | None = None,
) -> tuple[Stats, Histograms]:
    """({layer: {"weight": stats, "activation": stats}}, {layer in keep: {"weight", "activation":
    histogram of every value}}) over one forward pass on `windows` (n, T).

    Weight channels are input columns (max |W_j|), as for activations, so the two channel ratios
    compare directly. `attention_mask` (n, T): padded positions are left out of the activation
    stats. Use a few windows: every layer's input is held while its stats are computed.
    """
    mask = torch.ones_like(windows) if attention_mask is None else attention_mask
    layers = select_linears(model, targets, ())
    stats: Stats = {}
    hists: Histograms = {}
    prev: list[Any] = [None, None, None]  # last distinct input (held, so its memory is not reused), rows, stats

    handles = []
    for name, layer in layers.items():
        # (out, in); quantized layers report the float weight they compute with
        w = layer.dequantized_weight() if is_compressed(layer) else weight_view(layer).float()
        stats[name] = {"weight": tensor_stats(w)}  # (out, in): channels = inputs
        if name in keep:
            hists[name] = {"weight": histogram(w, bins)}

        def hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
            raw = args[0]  # (n, T, in)
            if prev[0] is None or raw.data_ptr() != prev[0].data_ptr() or raw.shape != prev[0].shape:
                # q/k/v and gate/up are fed the very same tensor: its stats are taken once
                x = raw[mask.bool()] if raw.shape[:2] == mask.shape else raw.reshape(-1, raw.shape[-1])  # (tokens, in)
                prev[:] = [raw, x, tensor_stats(x)]
            stats[_name]["activation"] = dict(prev[2])
            if _name in keep:
                hists[_name]["activation"] = histogram(prev[1], bins)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        model(input_ids=windows, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return stats, hists


def histogram(t: Tensor, bins: int = 200) -> Histogram:
    """(counts (bins,), edges (bins + 1,)) of every value of `t`, bins spanning its [min, max]."""
    flat = t.detach().reshape(-1).float()
    lo, hi = float(flat.min()), float(flat.max())
    hi = hi if hi > lo else lo + 1.0
    return torch.histc(flat, bins, lo, hi), torch.linspace(lo, hi, bins + 1)


COLOURS = ("#8da0cb", "#fc8d62", "#66c2a5")


def plot_distributions(
    runs: dict[str, tuple[Histograms, Stats]], path: Path, layers: Sequence[str] | None = None,
) -> None:
    """Histograms (log counts) of weights and activations, one row per layer, one colour per run
    ({label: (histograms, stats)}, e.g. baseline and compressed overlaid).
    `layers`: the rows (default: the layers with histograms in the first run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(layers if layers is not None else next(iter(runs.values()))[0])
    fig = Figure(figsize=(11, 3 * len(layers)))
    FigureCanvasAgg(fig)  # this figure's own Agg canvas; matplotlib's global backend is untouched
    for row, name in enumerate(layers):
        for col, kind in enumerate(("weight", "activation")):
            values = {label: hists[name][kind] for label, (hists, _) in runs.items() if kind in hists.get(name, {})}
            if not values:
                continue
            ax = fig.add_subplot(len(layers), 2, 2 * row + col + 1)
            for colour, (label, (counts, edges)) in zip(COLOURS, values.items()):
                ax.hist(edges[:-1].numpy(), bins=edges.numpy(), weights=counts.numpy(), log=True,
                        histtype="step" if len(values) > 1 else "bar", color=colour, label=label)
            lines = [f"{label}: {_stats_line(runs[label][1][name][kind])}" for label in values]
            ax.set_title("\n".join([f"{name} {kind}", *lines]), fontsize=7)
            if len(values) > 1:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _stats_line(s: dict[str, float]) -> str:
    return f"absmax {s['absmax']:.3g} kurt {s['kurtosis']:.1f} ch.ratio {s['channel_ratio']:.1f}"


def distribution_report(stats: Stats) -> str:
    """A markdown table: one row per layer, weight and activation kurtosis / channel ratio / absmax."""
    lines = ["| layer | w absmax | w kurtosis | w ch. ratio | x absmax | x kurtosis | x >6σ | x ch. ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        w, a = s["weight"], s.get("activation", {})
        lines.append(f"| {name} | {w['absmax']:.3g} | {w['kurtosis']:.1f} | {w['channel_ratio']:.1f} | "
                     f"{a.get('absmax', float('nan')):.3g} | {a.get('kurtosis', float('nan')):.1f} | "
                     f"{a.get('outlier_ratio', float('nan')):.2e} | {a.get('channel_ratio', float('nan')):.1f} |")
    return "\n".join(lines)


def summarize(stats: Stats) -> dict[str, Any]:
    """The layers with the largest activation absmax and channel ratio (where W8A8 suffers)."""
    acts = {n: s["activation"] for n, s in stats.items() if "activation" in s}
    worst = max(acts, key=lambda n: acts[n]["absmax"])
    return {"max_act_absmax": (worst, acts[worst]["absmax"]),
            "max_act_channel_ratio": max(((n, a["channel_ratio"]) for n, a in acts.items()), key=lambda t: t[1])}


def distribution_inputs(
    tokenizer: Any, windows: Tensor | None, texts: Sequence[str], n: int = 2,
) -> tuple[Tensor, Tensor, str]:
    """(input_ids, attention_mask, description) for a distribution pass: a decoder's first `n`
    evaluation windows (n, T), or an encoder's first 32·n evaluation texts, padded to the longest
    (at most 128 tokens, as for embeddings)."""
    if windows is not None:
        ids = windows[:n]  # (n, T)
        return ids, torch.ones_like(ids), f"{ids.shape[0]} evaluation windows × {ids.shape[1]} tokens"
    batch = list(texts[: ENCODER_TEXTS_PER_WINDOW * n])
    enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], f"{len(batch)} evaluation texts (≤ 128 tokens each)"


def notable_layers(stats: Stats) -> list[str]:
    """The layers worth a histogram, in model order: those with the largest activation channel
    ratio, activation absmax, activation kurtosis and weight kurtosis (up to four)."""
    picks = set()
    for kind, key in (("activation", "channel_ratio"), ("activation", "absmax"), ("activation", "kurtosis"),
                      ("weight", "kurtosis")):
        candidates = [n for n, s in stats.items() if kind in s]
        if candidates:
            picks.add(max(candidates, key=lambda n: stats[n][kind][key]))
    return [n for n in stats if n in picks]


@dataclass
class Comparison:
    """Per-layer stats of several models (e.g. baseline and compressed) on the same inputs, plus
    histograms of the `plotted` layers."""

    stats: dict[str, Stats]
    hists: dict[str, Histograms]
    plotted: list[str]
    inputs: str
    tokens: int
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        """Report.json's `distribution`: every stat to 6 significant digits; inf (a channel ratio
        whose median channel is all zeros) and NaN as null."""
        first = next(iter(self.stats.values()))
        return {"inputs": self.inputs, "tokens": self.tokens, "layers": len(first), "plotted": self.plotted,
                "wall_s": self.wall_s,
                **{label: _rounded(stats) for label, stats in self.stats.items()}}

    def plot(self, path: Path) -> None:
        """distribution.png: the plotted layers' histograms, the models overlaid."""
        plot_distributions({label: (self.hists[label], self.stats[label]) for label in self.stats}, path, self.plotted)


def compare_distributions(models: dict[str, nn.Module], ids: Tensor, mask: Tensor, inputs: str = "") -> Comparison:
    """Stats of every linear layer in the blocks of each model ({label: model}, the first one
    choosing the plotted layers) on `ids`/`mask` (n, T)."""
    started = time.perf_counter()
    stats: dict[str, Stats] = {}
    hists: dict[str, Histograms] = {}
    plotted: list[str] | None = None
    for label, model in models.items():
        keep = plotted if plotted is not None else set(select_linears(model, (), ()))
        with emulate_int_mm(model):  # W8A8 layers: the same integer products in fp32 (CPU `_int_mm` is slow)
            stats[label], kept = layer_distributions(model, ids, keep=keep, attention_mask=mask)
        plotted = plotted if plotted is not None else notable_layers(stats[label])
        hists[label] = {n: kept[n] for n in plotted if n in kept}
    return Comparison(stats, hists, plotted or [], inputs, int(mask.sum()), round(time.perf_counter() - started, 2))


def _rounded(stats: Stats) -> dict[str, dict[str, dict[str, float | None]]]:
    return {name: {kind: {k: float(f"{v:.6g}") if math.isfinite(v) else None for k, v in values.items()}
                   for kind, values in s.items()} for name, s in stats.items()}
