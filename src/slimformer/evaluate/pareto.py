"""The Pareto view: quality against size and against latency for every variant measured, with the
variants no other beats on all three (quality, size, latency) marked.

`pareto_front` is pure; `pareto_panels` draws onto matplotlib axes (the Figure API, no pyplot
state), used by the compress report's plot and by `benchmarks/deployment.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pareto_front(points: list[dict[str, float]], lower_is_better: dict[str, bool]) -> list[int]:
    """Indices of the points no other point dominates on the metrics in `lower_is_better`
    ({metric: True when smaller is better}); a point missing a metric is never on the front."""
    keys = list(lower_is_better)
    usable = [i for i, p in enumerate(points) if all(p.get(k) is not None for k in keys)]

    def better_or_equal(a: dict, b: dict, k: str) -> bool:
        return a[k] <= b[k] if lower_is_better[k] else a[k] >= b[k]

    def dominates(a: dict, b: dict) -> bool:
        return all(better_or_equal(a, b, k) for k in keys) and any(a[k] != b[k] for k in keys)

    return [i for i in usable if not any(dominates(points[j], points[i]) for j in usable if j != i)]


def pareto_panels(fig: Any, points: list[dict[str, Any]], quality: str, *, lower_quality_better: bool,
                  first_panel: int = 1, n_panels: int = 2, rows: int = 1) -> None:
    """Two scatter panels on `fig` (subplots `first_panel` and `first_panel + 1` of rows x n_panels):
    quality vs size (MB) and quality vs latency (ms), one labelled point per variant (`name`), the
    Pareto front (quality, size, latency) drawn larger and outlined."""
    front = set(pareto_front(points, {quality: lower_quality_better, "size_bytes": True, "latency_ms": True}))
    titles = ["quality vs size (outlined: Pareto front)", "quality vs latency"]
    for offset, (key, label, scale) in enumerate([("size_bytes", "size (MB)", 1e-6), ("latency_ms", "latency (ms)", 1.0)]):
        ax = fig.add_subplot(rows, n_panels, first_panel + offset)
        ax.set_title(titles[offset], fontsize=9)
        for i, p in enumerate(points):
            if p.get(key) is None or p.get(quality) is None:
                continue
            on_front = i in front
            ax.scatter(p[key] * scale, p[quality], s=70 if on_front else 30, color=f"C{i % 10}",
                       edgecolors="black" if on_front else "none", zorder=3)
            ax.annotate(p["name"], (p[key] * scale, p[quality]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(quality + (" (lower is better)" if lower_quality_better else " (higher is better)"))
        ax.grid(alpha=0.3)


def plot_pareto(points: list[dict[str, Any]], quality: str, path: Path, *, lower_quality_better: bool,
                title: str = "") -> None:
    """A PNG with the two Pareto panels for `points` ({name, quality, size_bytes, latency_ms})."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    pareto_panels(fig, points, quality, lower_quality_better=lower_quality_better)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
