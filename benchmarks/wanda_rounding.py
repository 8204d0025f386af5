"""Why llm-compressor's Wanda 60% lands lower than ours: it prunes int(0.6 x in) weights per row
(345 of 576, 921 of 1536: 59.92% overall), ours round(0.6 x numel) in all (60.00% exactly). This
reruns our `wanda` with llm-compressor's per-row count, same windows as benchmarks/pruning.py.

    python benchmarks/wanda_rounding.py [--max-windows N] [--calib-windows 64] [--sparsity 0.6]

Defaults are the evaluation protocol of docs/design.md (all evaluation windows, 64 calibration windows).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import harness  # benchmarks/harness.py
import torch
from torch import Tensor

import slimformer.prune.common as common


def floor_per_row(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask dropping int(sparsity x in) lowest scores of every row (llm-compressor's count)."""
    k = int(scores.shape[1] * sparsity)
    order = torch.sort(scores.detach().float(), dim=1, stable=True).indices
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order[:, :k], False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser, "out/wanda-rounding.json")
    parser.add_argument("--sparsity", type=float, default=0.6)
    args = parser.parse_args()
    bench = harness.prepare(args, Path(tempfile.mkdtemp(prefix="slimformer-wanda-")))
    setting = harness.Setting("wanda", "wanda", (f"steps: [{{method: wanda, sparsity: {args.sparsity}, num_samples: {{n}}}}]",), ())
    exact = harness.run_ours(setting, bench)
    common.row_masks = floor_per_row  # what `layer_mask(..., per_row=True)` calls
    floor = harness.run_ours(setting, bench)
    print(f"wanda {args.sparsity:.0%}: exact total {exact['ppl']:.2f}; int(s x in) per row {floor['ppl']:.2f}")


if __name__ == "__main__":
    main()
