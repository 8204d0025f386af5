"""SmolLM2-135M heads 25% (global scope): `gqa: within` vs `gqa: groups`, taylor and magnitude scores.

    python benchmarks/structured_gqa.py

Taylor scores are computed once (8 calibration windows x 512 of the lee-news pool) and both
removal modes choose from them; perplexity on the first 8 lee-news evaluation windows.
"""
from __future__ import annotations

import copy
import time

import torch

from slimformer.models.loading import load_bundle
from slimformer.data.sources import load_data
from slimformer.data.windows import lm_windows, calibration_windows
from slimformer.evaluate.perplexity import perplexity
from slimformer.models.structure import block_parts, keep_heads, sync_config
from slimformer.prune.structured_scores import taylor_scores, magnitude_head_scores
from slimformer.prune.structured_math import choose_heads, normalize_per_layer


def main() -> None:
    torch.set_num_threads(2)
    b = load_bundle("smollm2-135m")
    ev = lm_windows(b.tokenizer, load_data("lee-news", "eval").joined(), 512, max_windows=8)
    cal = calibration_windows(b.tokenizer, load_data("lee-news", "calib"), 8, 512)
    print("fp32", perplexity(b.model, ev, progress=False)["ppl"], flush=True)
    t = time.time()
    parts = block_parts(b.model)
    tay = taylor_scores(b.model, parts, "heads", cal, "decoder")
    print("taylor s", time.time() - t, flush=True)
    for label, scores in (("taylor", tay), ("magnitude", magnitude_head_scores(parts))):
        for gqa in ("within", "groups"):
            m = copy.deepcopy(b.model)
            ps = block_parts(m)
            removed = choose_heads(normalize_per_layer(scores), [p.kv_heads for p in ps], 0.25, "global", gqa)
            with torch.no_grad():
                for p, gone in zip(ps, removed):
                    if gone:
                        keep_heads(p, [h for h in range(p.heads) if h not in gone])
            sync_config(m)
            n = sum(len(g) for g in removed)
            print(label, gqa, "removed", n, "params", sum(q.numel() for q in m.parameters()), "ppl", perplexity(m, ev, progress=False)["ppl"], flush=True)


if __name__ == "__main__":
    main()
