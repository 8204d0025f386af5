"""The report: a table (terminal/markdown), the environment, and a quality-size-speed plot."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

# (key, label, format, lower is better)
ROWS = [
    ("ppl", "perplexity", "{:.2f}", True),
    ("cosine", "embedding cosine", "{:.4f}", False),
    ("accuracy", "probe accuracy", "{:.4f}", False),
    ("f1", "probe macro-F1", "{:.4f}", False),
    ("size_bytes", "size on disk (MB)", "{:.1f}", True),
    ("params", "parameters (M)", "{:.2f}", True),
    ("nonzero_params", "non-zero params (M)", "{:.2f}", True),
    ("latency_ms", "latency (ms, median)", "{:.1f}", True),
    ("decode_ms", "decode (ms/token, median)", "{:.1f}", True),
    ("peak_rss_bytes", "peak RSS (MB)", "{:.0f}", True),
    ("eval_wall_s", "evaluation wall (s)", "{:.1f}", True),
]
_SCALE = {"size_bytes": 1e-6, "params": 1e-6, "nonzero_params": 1e-6, "peak_rss_bytes": 1e-6}


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
    }


def _fmt(key: str, fmt: str, metrics: dict[str, Any]) -> str:
    value = metrics.get(key)
    return "—" if value is None else fmt.format(value * _SCALE.get(key, 1.0))


def metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table with one column per metrics dict, plus a ratio column when there are two."""
    names = list(columns)
    header = ["metric", *names] + (["ratio"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, fmt, _ in ROWS:
        if all(key not in m for m in columns.values()):
            continue
        cells = [label] + [_fmt(key, fmt, columns[n]) for n in names]
        if len(names) == 2:
            a, b = (columns[n].get(key) for n in names)
            cells.append(f"{b / a:.3f}×" if a and b is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(columns.values()))
    if "latency_ms" in first:
        lines.append(
            f"\nlatency: batch {first['latency_batch']} × seq {first['latency_seq']}, "
            f"{first['latency_threads']} threads, median of {first['latency_runs']} runs after warm-up"
            + (f"; decode: one token after a {first['decode_context']}-token prompt, key/value cache"
               if "decode_ms" in first else "")
        )
    return "\n".join(lines)


def stage_columns(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{stage: metrics}: the baseline, the model after each step that was measured (`N. method`), and
    the exported file in its runtime (`onnxruntime`); the last step's column is `compressed`."""
    columns = {"baseline": report["baseline"]}
    for i, step in enumerate(report.get("steps", [])):  # a hand-made report may have none
        if "metrics" in step:
            columns[f"{i + 1}. {step['method']}"] = step["metrics"]
    if len(columns) == 1:
        columns["compressed"] = report["compressed"]
    if "metrics" in report.get("export", {}):  # a GGUF file is measured only where llama.cpp is installed
        columns[report["export"].get("runtime", "export")] = report["export"]["metrics"]
    return columns


def stages_section(report: dict[str, Any]) -> str:
    """'Metrics after each stage' for report.md (empty when there is only baseline and compressed)."""
    columns = stage_columns(report)
    if len(columns) <= 2:
        return ""
    text = ("\n## Metrics after each stage\n\nEvery column measured in this run on the same data and latency "
            "settings; the last step's column is the compressed model above.\n\n" + metrics_table(columns) + "\n")
    if "export" in report:
        text += export_line(report["export"])
    return text


def export_line(e: dict[str, Any]) -> str:
    """One line on the exported file: its settings and how closely its runtime matches PyTorch."""
    settings = (f"int4_compute {e['int4_compute']}, kv_cache {e['kv_cache']}" if e["format"] == "onnx"
                else f"unquantized {e['unquantized']}")
    p = e.get("parity")
    check = (f"outputs in {e['runtime']} against PyTorch on real inputs: cosine {p['cosine']:.6f}, max |error| "
             f"{p['max_abs_err']:.3g}" if p else e.get("note", "not run here"))
    return f"\n`{e['file']}` ({e['format']}, {settings}): {check}.\n"


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: what was run and the before/after table."""
    steps = "\n".join(
        f"{i + 1}. `{s['method']}` — {s.get('wall_s', 0):.1f} s" for i, s in enumerate(report["steps"])
    )
    return (
        f"# slimformer report: {report['model']}\n\n"
        f"Evaluation data: `{report['eval_data']}`\n\n## Steps\n{steps}\n\n## Metrics\n"
        f"{metrics_table({'baseline': report['baseline'], 'compressed': report['compressed']})}\n\n"
        f"Total wall time: {report['wall_s']:.1f} s\n{stages_section(report)}{_per_layer_sections(report['steps'])}"
        + (distribution_section(report["distribution"]) if "distribution" in report else "")
    )


def _per_layer_sections(steps: list[dict[str, Any]]) -> str:
    """Per-layer choices a step reports as {"per_layer": {"title": ..., "values": {layer: value}}}."""
    out = []
    for i, step in enumerate(steps):
        per_layer = step.get("per_layer")
        if not per_layer:
            continue
        rows = "\n".join(f"| `{name}` | {value} |" for name, value in per_layer["values"].items())
        out.append(f"\n## Step {i + 1} (`{step['method']}`): {per_layer['title']}\n\n| layer | value |\n|---|---|\n{rows}\n")
    return "".join(out)


# (kind, stat, column label) of the distribution tables
DIST_COLUMNS = [
    ("weight", "absmax", "w absmax"),
    ("weight", "kurtosis", "w kurtosis"),
    ("activation", "absmax", "x absmax"),
    ("activation", "kurtosis", "x kurtosis"),
    ("activation", "channel_ratio", "x channel ratio"),
]


def distribution_section(dist: dict[str, Any], top: int = 10) -> str:
    """'Weight and activation distributions': median/max of each stat over the layers, baseline and
    compressed, then the `top` layers by baseline activation channel ratio (from report.json's
    `distribution`, see `evaluate.distribution.Comparison.to_json`)."""
    base, comp = dist["baseline"], dist["compressed"]
    lines = [
        "\n## Weight and activation distributions\n",
        f"The {dist['layers']} linear layers in the blocks, input (baseline) and compressed model, on "
        f"{dist['inputs']} ({dist['tokens']:,} tokens). Kurtosis: 3 for a normal distribution. Channel ratio: "
        "largest input channel's absmax over the median channel's (high = a few outlier channels, hard for "
        "per-tensor activation scales). Every layer's stats are in report.json (`distribution`); histograms of "
        f"{', '.join(f'`{n}`' for n in dist['plotted'])} in distribution.png.\n",
        "| over all layers | baseline median | baseline max | compressed median | compressed max | max at (baseline) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, key, label in DIST_COLUMNS:
        cells = []
        for stats in (base, comp):
            values = [s[kind][key] for s in stats.values() if kind in s and s[kind][key] is not None]
            cells += [_num(statistics.median(values)), _num(max(values))] if values else ["—", "—"]
        worst = max((n for n in base if kind in base[n] and base[n][kind][key] is not None),
                    key=lambda n: base[n][kind][key], default=None)
        lines.append(f"| {label} | {' | '.join(cells)} | {f'`{worst}`' if worst else '—'} |")
    ranked = sorted((n for n in base if base[n].get("activation", {}).get("channel_ratio") is not None),
                    key=lambda n: -base[n]["activation"]["channel_ratio"])[:top]
    lines += [f"\nTop {len(ranked)} layers by baseline activation channel ratio (baseline → compressed):\n",
              "| layer | " + " | ".join(label for _, _, label in DIST_COLUMNS) + " |",
              "|---|" + "---|" * len(DIST_COLUMNS)]
    for name in ranked:
        cells = [f"{_dist_cell(base[name], kind, key)} → {_dist_cell(comp.get(name, {}), kind, key)}"
                 for kind, key, _ in DIST_COLUMNS]
        lines.append(f"| `{name}` | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _dist_cell(stats: dict[str, Any], kind: str, key: str) -> str:
    value = stats.get(kind, {}).get(key)
    return "—" if value is None else _num(value)


def _num(value: float) -> str:
    """3 significant digits, whole numbers from 100 to 99,999, exponent notation beyond."""
    return f"{value:.0f}" if 100 <= abs(value) < 1e5 else f"{value:.3g}"


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Bar charts of quality, size and latency, baseline vs compressed; below them, when all three
    were measured, the Pareto view (quality vs size, quality vs latency; `evaluate.pareto`)."""
    from matplotlib.figure import Figure  # the Figure API touches no global pyplot state

    from slimformer.evaluate.pareto import pareto_panels

    base, comp = report["baseline"], report["compressed"]
    quality = "ppl" if "ppl" in base else "cosine"
    panels = [(quality, quality), ("size_bytes", "size (MB)"), ("latency_ms", "latency (ms)")]
    panels = [(k, label) for k, label in panels if k in base and k in comp]
    pareto = len(panels) == 3
    cols, rows = max(len(panels), 2), 2 if pareto else 1
    fig = Figure(figsize=(4 * cols, 3.5 * rows))
    if pareto:
        stages = stage_columns(report)
        points = [{"name": name, **m} for name, m in stages.items()]
        pareto_panels(fig, points, quality, lower_quality_better=quality == "ppl", first_panel=cols + 1,
                      n_panels=cols, rows=2)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = [base[key] * _SCALE.get(key, 1.0), comp[key] * _SCALE.get(key, 1.0)]
        bars = ax.bar(["baseline", "compressed"], values, color=["#8da0cb", "#fc8d62"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(label)
    fig.suptitle(f"{report['model']}: baseline vs compressed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
