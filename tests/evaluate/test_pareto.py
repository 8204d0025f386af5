"""Pareto front (pure) and the plots that show it."""

from __future__ import annotations

import struct

from slimformer.evaluate.pareto import pareto_front, plot_pareto
from slimformer.evaluate.report import plot_report

LOWER = {"ppl": True, "size_bytes": True, "latency_ms": True}


def test_front_keeps_only_undominated_points() -> None:
    points = [
        {"ppl": 30.0, "size_bytes": 500, "latency_ms": 10.0},  # best quality
        {"ppl": 33.0, "size_bytes": 100, "latency_ms": 4.0},  # smallest and fastest
        {"ppl": 34.0, "size_bytes": 200, "latency_ms": 5.0},  # dominated by the one above
        {"ppl": 31.0, "size_bytes": 300, "latency_ms": 12.0},  # a trade-off: kept
        {"ppl": 33.0, "size_bytes": 100, "latency_ms": 4.0},  # a tie dominates nothing
        {"ppl": None, "size_bytes": 1, "latency_ms": 1.0},  # unmeasured quality: never on the front
    ]
    assert pareto_front(points, LOWER) == [0, 1, 3, 4]


def test_higher_is_better_metrics() -> None:
    points = [{"cosine": 0.99, "size_bytes": 10}, {"cosine": 0.95, "size_bytes": 10}, {"cosine": 0.90, "size_bytes": 5}]
    assert pareto_front(points, {"cosine": False, "size_bytes": True}) == [0, 2]


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_plots_are_written(tmp_path) -> None:
    points = [{"name": "fp32", "ppl": 29.3, "size_bytes": 538e6, "latency_ms": 40.0},
              {"name": "int4", "ppl": 32.1, "size_bytes": 170e6, "latency_ms": 15.0}]
    plot_pareto(points, "ppl", tmp_path / "p.png", lower_quality_better=True, title="t")
    assert _png_size(tmp_path / "p.png") == (1210, 462)
    report = {"model": "m", "baseline": {"ppl": 29.3, "size_bytes": 538e6, "latency_ms": 40.0},
              "compressed": {"ppl": 32.1, "size_bytes": 170e6, "latency_ms": 15.0}}
    plot_report(report, tmp_path / "r.png")
    assert _png_size(tmp_path / "r.png") == (1200, 700)  # bars above, the Pareto view below
    del report["compressed"]["latency_ms"]
    plot_report(report, tmp_path / "r2.png")
    assert _png_size(tmp_path / "r2.png") == (800, 350)  # no latency: bars only
