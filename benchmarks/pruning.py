"""Our pruning methods against peers at the same settings, in one process.

    .venv/bin/python benchmarks/pruning.py --json out/pruning.json [--max-windows N] [--calib-windows N]
        [--only wanda-50 sparsegpt-24 llm-compressor ...] [--ours-only]
        [--model smollm2-135m|gemma3-270m|DIR] [--calib-text lee-news] [--eval-texts lee-news shakespeare]

Protocol as benchmarks/peers.py (whose helpers this reuses): every variant pruned from a fresh copy
of the same fp32 model, perplexity with `slimformer.evaluate.perplexity` on the same `lee-news`
evaluation windows, data-driven methods calibrated on the same windows (the first N x 512 tokens
of the calibration pool; `gradient`/`taylor` on the first min(N, 16), their default, since each
window costs a backward pass), only the Linear layers inside the blocks pruned (LM head and
embeddings untouched on both sides). Seconds are the pruning call alone. Ratios: peer / ours.

Peers: `torch.nn.utils.prune.l1_unstructured` per layer, llm-compressor's WandaPruningModifier and
SparseGPTModifier (damp 0.01, block 128; OWL via sparsity_profile="owl", owl_m 5, owl_lmbda 0.08).
llm-compressor 0.14's OWL fails here before pruning ("ValueError: Cannot invoke event before
initializing": it runs its activation pass from inside the modifier's initialization, before the
session is initialized; reproduced on a tiny Llama too); its rows then say "cannot run".
"""

from __future__ import annotations

import argparse
import copy
import traceback
from typing import Any

import harness  # benchmarks/harness.py: Bench, prepare, run_ours, timed, table, JSON
import peer_llmcompressor  # benchmarks/peer_llmcompressor.py: oneshot on our windows
import transformers
from torch import nn


LLMC, TORCH_PRUNE = "llm-compressor", "torch.nn.utils.prune"
LIBRARY_MODULES = {LLMC: "llmcompressor", TORCH_PRUNE: "torch.nn.utils.prune"}
CALIB = ", num_samples: {n}"
BLOCKS = "re:model.layers.\\d+$"  # llm-compressor groups OWL statistics per decoder layer


def ours(method: str, amount: str, extra: str = "") -> str:
    return f"steps: [{{method: {method}, {amount}{extra}}}]"


def torch_l1(sparsity: float) -> harness.PeerFn:
    """torch.nn.utils.prune.l1_unstructured on each target layer, then made permanent."""

    def run(model: nn.Module, bench: harness.Bench) -> tuple[Any, list[str]]:
        import torch.nn.utils.prune as tprune

        for name in bench.targets:
            layer = model.get_submodule(name)
            tprune.l1_unstructured(layer, "weight", amount=sparsity)
            tprune.remove(layer, "weight")
        return model, ["per layer (each target Linear ranked on its own)"]

    return run


def llmc_pruner(kind: str, sparsity: float, structure: str = "0:0", owl: bool = False) -> harness.PeerFn:
    """llm-compressor's SparseGPTModifier or WandaPruningModifier through `oneshot` on our windows."""

    def run(model: nn.Module, bench: harness.Bench) -> tuple[Any, list[str]]:
        from llmcompressor.modifiers.pruning import WandaPruningModifier
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        kw: dict[str, Any] = {"sparsity": sparsity, "mask_structure": structure, "ignore": ["re:.*lm_head"]}
        if owl:
            kw.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08, targets=[BLOCKS])
        if kind == "sparsegpt":
            modifier = SparseGPTModifier(block_size=128, dampening_frac=0.01, **kw)
        else:
            modifier = WandaPruningModifier(**kw)
        peer_llmcompressor._oneshot(model, bench, [modifier], calibrate=True)
        return model, [f"mask_structure {structure}"] + (["OWL: owl_m 5, owl_lmbda 0.08"] if owl else [])

    return run


def _setting(key: str, label: str, recipe: str, *peer_list: harness.Peer) -> harness.Setting:
    return harness.Setting(key, label, (recipe,), tuple(peer_list))


def _llmc(kind: str, sparsity: float, structure: str = "0:0", owl: bool = False) -> harness.Peer:
    name = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}[kind]
    return harness.Peer(LLMC, f"llm-compressor {name}" + (" (owl)" if owl else ""), llmc_pruner(kind, sparsity, structure, owl))


SETTINGS = (
    _setting("magnitude-50", "magnitude 50% per layer", ours("magnitude", "sparsity: 0.5"),
             harness.Peer(TORCH_PRUNE, "torch.nn.utils.prune.l1_unstructured", torch_l1(0.5))),
    _setting("gradient-50", "gradient 50% per layer", ours("gradient", "sparsity: 0.5", ", num_samples: {g}")),
    _setting("taylor-50", "taylor 50% per layer", ours("taylor", "sparsity: 0.5", ", num_samples: {g}")),
    _setting("wanda-50", "wanda 50%", ours("wanda", "sparsity: 0.5", CALIB), _llmc("wanda", 0.5)),
    _setting("sparsegpt-50", "sparsegpt 50%", ours("sparsegpt", "sparsity: 0.5", CALIB), _llmc("sparsegpt", 0.5)),
    _setting("wanda-24", "wanda 2:4", ours("wanda", "pattern: '2:4'", CALIB), _llmc("wanda", 0.5, "2:4")),
    _setting("wanda-48", "wanda 4:8", ours("wanda", "pattern: '4:8'", CALIB), _llmc("wanda", 0.5, "4:8")),
    _setting("sparsegpt-24", "sparsegpt 2:4", ours("sparsegpt", "pattern: '2:4'", CALIB), _llmc("sparsegpt", 0.5, "2:4")),
    _setting("sparsegpt-48", "sparsegpt 4:8", ours("sparsegpt", "pattern: '4:8'", CALIB), _llmc("sparsegpt", 0.5, "4:8")),
    # ours only: `sparsegpt` as it was before 2026-11-30, all tokens weighted equally (the peer rows
    # of the same settings are the keys above; llm-compressor weights tokens equally)
    _setting("sparsegpt-50-equal", "sparsegpt 50%, sink_weight 1",
             ours("sparsegpt", "sparsity: 0.5", CALIB + ", sink_weight: 1")),
    _setting("sparsegpt-24-equal", "sparsegpt 2:4, sink_weight 1",
             ours("sparsegpt", "pattern: '2:4'", CALIB + ", sink_weight: 1")),
    _setting("sparsegpt-48-equal", "sparsegpt 4:8, sink_weight 1",
             ours("sparsegpt", "pattern: '4:8'", CALIB + ", sink_weight: 1")),
    _setting("wanda-owl-50", "wanda 50% owl", ours("wanda", "sparsity: 0.5, allocation: owl", CALIB),
             _llmc("wanda", 0.5, owl=True)),
    _setting("wanda-60", "wanda 60% uniform", ours("wanda", "sparsity: 0.6", CALIB), _llmc("wanda", 0.6)),
    _setting("wanda-owl-60", "wanda 60% owl", ours("wanda", "sparsity: 0.6, allocation: owl", CALIB),
             _llmc("wanda", 0.6, owl=True)),
)


def select(only: list[str] | None, ours_only: bool) -> list[tuple[harness.Setting, list[harness.Peer]]]:
    """Settings and peers named by --only (harness.selected over this file's settings)."""
    return [(s, [] if ours_only else chosen) for s, chosen in harness.selected(only, SETTINGS, LIBRARY_MODULES)]

def run_peer(peer: harness.Peer, bench: harness.Bench) -> dict[str, Any]:
    """One peer on a fresh copy (its library imported before the timer); failures become rows."""
    try:
        __import__(LIBRARY_MODULES[peer.library])
        if peer.library == LLMC:
            peer_llmcompressor._calib_dataset(bench)
        model = copy.deepcopy(bench.model)
        (evaluated, notes), seconds = harness.timed(lambda: peer.run(model, bench))
        return {**harness.evaluate(evaluated, bench), "compress_s": round(seconds, 1), "notes": notes}
    except Exception as exc:  # a peer failing is a result, not a crash
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-8)}


def run(plan: list[tuple[harness.Setting, list[harness.Peer]]], bench: harness.Bench) -> list[dict[str, Any]]:
    """Ours once per setting, then each peer; one row per (setting, peer), printed as it comes."""
    n = bench.calib_windows.shape[0]
    rows = []
    for setting, chosen in plan:
        setting = harness.Setting(setting.key, setting.label,
                                tuple(r.replace("{g}", str(min(n, 16))) for r in setting.ours), setting.peers)
        mine = harness.run_ours(setting, bench)
        print(f"[{setting.key}] ours: {harness.ppl_line(mine)}, {mine['compress_s']} s", flush=True)
        if not chosen:
            rows.append({"setting": setting.label, "key": setting.key, "ours": mine, "peer": "—", "library": None,
                         "error": "no peer run" if setting.peers else "no peer has this method"})
        for peer in chosen:
            result = run_peer(peer, bench)
            rows.append({"setting": setting.label, "key": setting.key, "ours": mine, "peer": peer.label,
                         "library": peer.library, **result})
            shown = f"{harness.ppl_line(result)}, {result['compress_s']} s" if "ppl" in result else f"cannot run: {result['error']}"
            print(f"[{setting.key}] {peer.label}: {harness.one_line(shown)}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser, "out/pruning.json")
    parser.add_argument("--ours-only", action="store_true", help="run our side of the selected settings only")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    plan = select(args.only, args.ours_only)
    harness.run_benchmark(args, plan, run, "slimformer-pruning-")

if __name__ == "__main__":
    main()
