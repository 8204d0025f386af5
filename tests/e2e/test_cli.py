"""End to end through the CLI: compress, evaluate, load; and every bad input -> exit 2, no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimformer
from slimformer.cli import main
from slimformer.evaluate.measure import EvalSettings

RECIPE = """
steps:
  - method: magnitude
    sparsity: 0.3
    scope: global
  - method: rtn
    bits: 4
    group_size: 32
    ignore: ["re:.*down_proj"]
"""


def _recipe(tmp_path: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_compress_smollm_end_to_end(tmp_path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "slimformer", "compress", "smollm2-135m", "--recipe", str(_recipe(tmp_path)),
           "--output", str(out), "--max-windows", "2", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "size on disk" in done.stdout
    assert {"model.safetensors", "manifest.json", "config.json", "recipe.yaml", "report.json", "report.md",
            "report.png"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"model", "recipe", "baseline", "compressed", "steps", "environment"}
    base, comp = report["baseline"], report["compressed"]
    assert comp["size_bytes"] == sum((out / f).stat().st_size for f in ("model.safetensors", "manifest.json", "config.json"))
    assert comp["size_bytes"] < 0.5 * base["size_bytes"]
    assert comp["nonzero_params"] < 0.8 * base["nonzero_params"]
    assert 1.0 < comp["ppl"] / base["ppl"] < 3.0
    assert base["latency_ms"] > 0 and comp["peak_rss_bytes"] > 0
    # the folder loads back and evaluates to the same perplexity
    json_path = tmp_path / "eval.json"
    assert main(["evaluate", str(out), "--max-windows", "2", "--no-latency", "--quiet", "--json", str(json_path)]) == 0
    again = json.loads(json_path.read_text())["metrics"]
    assert again["ppl"] == pytest.approx(comp["ppl"], rel=1e-5)
    assert again["size_bytes"] == comp["size_bytes"]


PIPELINE = """
steps:
  - method: neurons
    sparsity: 0.25
    num_samples: 8
    seq_len: 256
  - method: distill
    alpha: 1.0
    temperature: 1.0
    steps: 12
    lr: 1.0e-4
    batch_size: 2
    seq_len: 128
  - method: gptq
    bits: 4
    group_size: 128
    num_samples: 4
    seq_len: 256
export:
  format: onnx
  int4_compute: int8
"""


@pytest.mark.slow
def test_one_recipe_prunes_distills_quantizes_exports_and_reports_each_stage(tmp_path) -> None:
    """neurons -> distill -> gptq -> ONNX in one command; every stage measured on the same windows."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "slimformer", "compress", "smollm2-135m", "--recipe", str(_recipe(tmp_path, PIPELINE)),
           "--output", str(out), "--max-windows", "2", "--no-latency", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "after each stage" in done.stdout and "onnxruntime" in done.stdout
    report = json.loads((out / "report.json").read_text())
    base = report["baseline"]
    pruned, distilled, quantized = (s["metrics"] for s in report["steps"])
    assert quantized == report["compressed"]
    assert pruned["params"] < 0.9 * base["params"] and distilled["params"] == pruned["params"]
    assert pruned["ppl"] > 1.3 * base["ppl"]  # removing a quarter of the FFN costs quality ...
    assert distilled["ppl"] < 0.95 * pruned["ppl"]  # ... and distillation from the input model wins some back
    assert quantized["size_bytes"] < 0.45 * pruned["size_bytes"]
    onnx = report["export"]
    assert onnx["file"] == "model.onnx" and onnx["int4_compute"] == "int8"
    assert onnx["metrics"]["size_bytes"] == (out / "model.onnx").stat().st_size
    assert onnx["parity"]["cosine"] > 0.99
    assert onnx["metrics"]["ppl"] == pytest.approx(quantized["ppl"], rel=0.05)  # onnxruntime's own perplexity
    assert "export" in (out / "recipe.yaml").read_text()
    assert "## Metrics after each stage" in (out / "report.md").read_text()


def test_step_metrics_can_be_skipped_and_export_needs_no_folder(tiny_dirs) -> None:
    recipe = {"steps": [{"method": "magnitude", "sparsity": 0.5}, {"method": "rtn", "bits": 8, "group_size": -1}],
              "export": {}}
    settings = EvalSettings(max_windows=1, latency=False, progress=False, step_metrics=False)
    report = slimformer.compress(str(tiny_dirs["llama"]), recipe, eval=settings, progress=False)
    assert all("metrics" not in s for s in report["steps"])
    assert report["export"]["parity"]["cosine"] > 0.999
    assert report["export"]["metrics"]["ppl"] == pytest.approx(report["compressed"]["ppl"], rel=1e-3)


def test_kv_cache_export_of_an_encoder_fails_before_any_step(tmp_path, tiny_dirs, capsys) -> None:
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, "steps:\n  - method: rtn\nexport:\n  kv_cache: true\n")
    code = main(["compress", str(tiny_dirs["bert"]), "--recipe", str(recipe), "--output", str(out), "--quiet",
                 "--no-latency"])
    assert code == 2 and "kv_cache" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compress_local_decoder_folders(tmp_path, tiny_dirs, family) -> None:
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, "steps:\n  - method: rtn\n    bits: 8\n    group_size: -1\n    symmetric: true\n")
    assert main(["compress", str(tiny_dirs[family]), "--recipe", str(recipe), "--output", str(out),
                 "--max-windows", "2", "--no-latency", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0]["layers"] == {"llama": 14, "gpt2": 8}[family]
    assert report["compressed"]["ppl"] == pytest.approx(report["baseline"]["ppl"], rel=0.02)
    model = slimformer.load(out)
    assert sum(type(m).__name__ == "QuantLinear" for m in model.modules()) == report["steps"][0]["layers"]


def test_compress_encoder_reports_cosine_and_probe(tmp_path, tiny_dirs) -> None:
    data = tmp_path / "labelled.csv"
    rows = [("good great fine", "pos"), ("bad awful poor", "neg")] * 30
    data.write_text("text,label\n" + "\n".join(f"{t} {i},{y}" for i, (t, y) in enumerate(rows)))
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, "steps:\n  - method: magnitude\n    sparsity: 0.1\n")
    assert main(["compress", str(tiny_dirs["bert"]), "--recipe", str(recipe), "--output", str(out),
                 "--eval", str(data), "--calib", str(data), "--no-latency", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0.8 < report["compressed"]["cosine"] < 1.0
    assert report["baseline"]["accuracy"] == pytest.approx(1.0)
    assert {"precision", "recall", "f1"} <= set(report["compressed"])


BAD_RECIPES = {
    "malformed yaml": ("steps: [", "not valid YAML"),
    "unknown method": ("steps:\n  - method: prune_all\n", "unknown method"),
    "unknown key": ("steps:\n  - method: rtn\n    bitz: 4\n", "unknown key"),
    "sparsity 1.0": ("steps:\n  - method: magnitude\n    sparsity: 1.0\n", "sparsity must be in"),
    "bits 9": ("steps:\n  - method: rtn\n    bits: 9\n", "bits must be an integer from 2 to 8"),
    "bits 1": ("steps:\n  - method: rtn\n    bits: 1\n", "bits must be an integer from 2 to 8"),
    "no match": ("steps:\n  - method: rtn\n    targets: ['re:no_such_layer']\n", "matches no linear layer"),
    "export format": ("steps:\n  - method: rtn\nexport:\n  format: tflite\n", "expected one of 'onnx'"),
    "export scalar": ("steps:\n  - method: rtn\nexport: onnx\n", "'export' must be a mapping"),
    "export key": ("steps:\n  - method: rtn\nexport:\n  int4: yes\n", "unknown key(s) int4"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exit_2_no_output(tmp_path, tiny_dirs, capsys, case) -> None:
    text, message = BAD_RECIPES[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in tiny_dirs["llama"].iterdir())
    code = main(["compress", str(tiny_dirs["llama"]), "--recipe", str(_recipe(tmp_path, text)),
                 "--output", str(out), "--quiet", "--no-latency", "--max-windows", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert sorted(p.name for p in tiny_dirs["llama"].iterdir()) == before


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("no/such/folder", [], "neither a built-in alias"),
        ("gpt-17", [], "neither a built-in alias"),
        ("LLAMA", ["--eval", "EMPTY"], "empty"),
        ("LLAMA", ["--calib", "EMPTY"], "empty"),
        ("LLAMA", ["--eval", "missing.txt"], "missing.txt"),
    ],
)
def test_bad_inputs_exit_2(tmp_path, tiny_dirs, capsys, model, extra, message) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model = str(tiny_dirs["llama"]) if model == "LLAMA" else model
    extra = [str(empty) if x == "EMPTY" else str(tmp_path / x) if x.endswith(".txt") else x for x in extra]
    out = tmp_path / "out"
    code = main(["compress", model, "--recipe", str(_recipe(tmp_path)), "--output", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err.lower() and "Traceback" not in err
    assert not out.exists()


def test_exit_code_2_from_the_real_command(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "slimformer", "compress", "nowhere", "--recipe", str(_recipe(tmp_path)),
         "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_input_model_untouched(smollm_bundle, tmp_path) -> None:
    before = smollm_bundle.model.model.layers[0].mlp.up_proj.weight.clone()
    slimformer.compress(smollm_bundle, "steps:\n  - method: magnitude\n    sparsity: 0.5\n",
                        eval=slimformer.api.EvalSettings(max_windows=1, latency=False, progress=False))
    assert torch.equal(smollm_bundle.model.model.layers[0].mlp.up_proj.weight, before)


def test_layerwise_checkpoint_removed_on_success_and_foreign_one_refused(tmp_path, tiny_dirs, capsys) -> None:
    recipe = _recipe(tmp_path, "steps:\n  - method: gptq\n    bits: 4\n    group_size: 16\n    num_samples: 2\n")
    args = ["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--max-windows", "2", "--no-latency", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "a"), "--resume"]) == 0  # nothing to resume: a normal run
    assert (tmp_path / "a" / "report.json").exists() and not (tmp_path / ".a.resume").exists()

    (tmp_path / ".b.resume").mkdir()
    (tmp_path / ".b.resume" / "fingerprint.json").write_text('{"fingerprint": "0000"}')
    assert main([*args, "--output", str(tmp_path / "b"), "--resume"]) == 2
    assert "another model, recipe" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_mixed_reports_bits_per_layer(tmp_path, tiny_dirs) -> None:
    recipe = _recipe(tmp_path, "steps:\n  - method: mixed\n    avg_bits: 4\n    group_size: 16\n"
                               "    choices: [2, 4, 8]\n    num_samples: 2\n    seq_len: 128\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--output", str(out),
                 "--max-windows", "2", "--no-latency", "--quiet"]) == 0
    step = json.loads((out / "report.json").read_text())["steps"][0]
    assert step["layers"] == 14 and step["avg_bits_chosen"] <= 4.0
    assert sum(step["bits_histogram"].values()) == 14
    assert "bits per layer" in (out / "report.md").read_text()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_distribution_section_and_plot(tmp_path, tiny_dirs, family) -> None:
    recipe = _recipe(tmp_path, "steps:\n  - method: rtn\n    bits: 4\n    group_size: 16\n")
    out = tmp_path / "out"
    extra = ["--max-windows", "2"]
    if family == "bert":
        data = tmp_path / "labelled.csv"
        data.write_text("text,label\n" + "\n".join(f"good great fine {i},pos\nbad awful poor {i},neg" for i in range(20)))
        extra = ["--eval", str(data), "--calib", str(data)]
    assert main(["compress", str(tiny_dirs[family]), "--recipe", str(recipe), "--output", str(out),
                 "--distribution", "--no-latency", "--quiet", *extra]) == 0
    assert (out / "distribution.png").stat().st_size > 10_000
    dist = json.loads((out / "report.json").read_text())["distribution"]
    layers = {"llama": 14, "bert": 12}[family]
    assert dist["layers"] == layers and dist["tokens"] > 0 and 1 <= len(dist["plotted"]) <= 4
    assert dist["baseline"].keys() == dist["compressed"].keys() and len(dist["baseline"]) == layers
    # 4-bit codes change every weight matrix; the first block's inputs are the same embeddings
    name = next(iter(dist["baseline"]))
    assert dist["compressed"][name]["weight"] != dist["baseline"][name]["weight"]
    assert dist["compressed"][name]["activation"] == dist["baseline"][name]["activation"]

    section = (out / "report.md").read_text().split("## Weight and activation distributions")[1]
    summary = [line for line in section.splitlines() if line.startswith(("| w ", "| x "))]
    assert len(summary) == 5 and all(float(cell) >= 0 for line in summary for cell in line.split("|")[2:6])
    rows = [line.split("|")[2:-1] for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == min(10, layers)
    assert all(float(a) >= 0 and float(b) >= 0 for row in rows for a, b in (cell.split("→") for cell in row))
