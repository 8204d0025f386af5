"""Per-layer weight and activation distributions: how heavy-tailed they are, and whether a few
channels dominate (what makes per-tensor activation quantization hard and SmoothQuant useful).

`layer_distributions` runs the model once on a few windows with hooks on the linear layers;
`plot_distributions` draws histograms of a few layers into a PNG (matplotlib's Agg canvas,
created locally: no global backend or pyplot state is touched).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimformer.models.layout import select_linears, weight_view


def tensor_stats(x: Tensor) -> dict[str, float]:
    """Stats of a (rows, channels) tensor: absmax, std, kurtosis (Pearson: 3 for a normal),
    outlier_ratio (fraction with |x| > 6 std) and channel_ratio (largest channel absmax over the
    median channel absmax; channels = last dimension)."""
    x = x.detach().double().reshape(-1, x.shape[-1])  # (rows, channels)
    centred = x - x.mean()
    var = centred.pow(2).mean()
    std = float(var.sqrt())
    channel_absmax = x.abs().amax(dim=0)  # (channels,)
    median = float(channel_absmax.median())
    return {
        "absmax": float(x.abs().max()),
        "std": std,
        "kurtosis": float(centred.pow(4).mean() / var.pow(2)) if var > 0 else 0.0,
        "outlier_ratio": float((x.abs() > 6 * std).double().mean()),
        "channel_ratio": float(channel_absmax.max()) / median if median > 0 else float("inf"),
    }


@torch.no_grad()
def layer_distributions(
    model: nn.Module, windows: Tensor, targets: tuple[str, ...] = (), keep: tuple[str, ...] = (),
    sample: int = 50_000,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, Tensor]]]:
    """({layer: {"weight": stats, "activation": stats}}, {layer in keep: {"weight", "activation":
    value samples for histograms}}) over one forward pass on `windows` (n, T).

    Weight channels are input columns (max |W_j|), as for activations, so the two channel ratios
    compare directly. Use a few windows: every layer's input is held while its stats are computed.
    """
    layers = select_linears(model, targets, ())
    stats: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def pick(t: Tensor) -> Tensor:
        flat = t.reshape(-1).float()
        return flat[torch.randint(flat.numel(), (min(sample, flat.numel()),), generator=gen)]

    handles = []
    for name, layer in layers.items():
        # (out, in); quantized layers report the float weight they compute with
        w = layer.dequantized_weight() if hasattr(layer, "dequantized_weight") else weight_view(layer).float()
        stats[name] = {"weight": tensor_stats(w)}  # (out, in): channels = inputs
        if name in keep:
            samples[name] = {"weight": pick(w)}

        def hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # (tokens, in)
            stats[_name]["activation"] = tensor_stats(x)
            if _name in keep:
                samples[_name]["activation"] = pick(x)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        model(input_ids=windows, attention_mask=torch.ones_like(windows))
    finally:
        for h in handles:
            h.remove()
    return stats, samples


def plot_distributions(samples: dict[str, dict[str, Tensor]], stats: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Histograms (log counts) of weights and activations, one row per layer in `samples`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.6 * len(samples)))
    FigureCanvasAgg(fig)  # this figure's own Agg canvas; matplotlib's global backend is untouched
    for row, (name, values) in enumerate(samples.items()):
        for col, kind in enumerate(("weight", "activation")):
            if kind not in values:
                continue
            ax = fig.add_subplot(len(samples), 2, 2 * row + col + 1)
            ax.hist(values[kind].numpy(), bins=200, log=True, color="#8da0cb" if col == 0 else "#fc8d62")
            s = stats[name][kind]
            ax.set_title(f"{name} {kind}\nabsmax {s['absmax']:.3g}  kurtosis {s['kurtosis']:.1f}  "
                         f"channel ratio {s['channel_ratio']:.1f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def distribution_report(stats: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per layer, weight and activation kurtosis / channel ratio / absmax."""
    lines = ["| layer | w absmax | w kurtosis | w ch. ratio | x absmax | x kurtosis | x >6σ | x ch. ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        w, a = s["weight"], s.get("activation", {})
        lines.append(f"| {name} | {w['absmax']:.3g} | {w['kurtosis']:.1f} | {w['channel_ratio']:.1f} | "
                     f"{a.get('absmax', float('nan')):.3g} | {a.get('kurtosis', float('nan')):.1f} | "
                     f"{a.get('outlier_ratio', float('nan')):.2e} | {a.get('channel_ratio', float('nan')):.1f} |")
    return "\n".join(lines)


def summarize(stats: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The layers with the largest activation absmax and channel ratio (where W8A8 suffers)."""
    acts = {n: s["activation"] for n, s in stats.items() if "activation" in s}
    worst = max(acts, key=lambda n: acts[n]["absmax"])
    return {"max_act_absmax": (worst, acts[worst]["absmax"]),
            "max_act_channel_ratio": max(((n, a["channel_ratio"]) for n, a in acts.items()), key=lambda t: t[1])}
