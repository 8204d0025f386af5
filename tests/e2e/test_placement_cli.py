"""`--device` and `--dtype` through the CLI: a bad device or a missing GPU exits 2 with nothing
written; a bf16 folder compresses in bf16 and the report says so, with its peak memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimformer.cli import main

RECIPE = "steps: [{method: gptq, bits: 4, group_size: 32, num_samples: 2, seq_len: 64}]\n"
FAST = ["--max-windows", "1", "--no-latency", "--decode-context", "0", "--quiet"]


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.mark.parametrize("device", ["tpu", "cuda:one"] + (["cuda", "cuda:1"] if not torch.cuda.is_available() else []))
def test_a_bad_device_exits_2_and_writes_nothing(tmp_path, tiny_dirs, recipe, capsys, device) -> None:
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--output", str(out),
                 "--device", device, *FAST]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert main(["evaluate", str(tiny_dirs["llama"]), "--device", device, *FAST]) == 2
    assert main(["bench", str(tiny_dirs["llama"]), "--device", device, "--runs", "1"]) == 2


def test_a_bad_dtype_is_refused_by_the_parser(tiny_dirs, recipe, tmp_path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--output", str(tmp_path / "o"),
              "--dtype", "int4"])
    assert exc.value.code == 2


def test_bf16_folder_compresses_in_bf16_and_reports_it(tmp_path, tiny_dirs, recipe, smollm_bundle) -> None:
    import transformers

    folder = tmp_path / "bf16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).to(torch.bfloat16)
    model.save_pretrained(folder)
    smollm_bundle.tokenizer.save_pretrained(folder)
    for dtype, want in (("auto", "bfloat16"), ("float32", "float32")):
        out = tmp_path / f"out-{dtype}"
        assert main(["compress", str(folder), "--recipe", str(recipe), "--output", str(out), "--device", "cpu",
                     "--dtype", dtype, *FAST]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["dtype"] == want and report["device"] == "cpu"
        assert report["memory"]["peak_rss_bytes"] > 10e6 and report["memory"]["peak_device_bytes"] is None
        assert report["compressed"]["ppl"] < 2 * report["baseline"]["ppl"]
    evaluated = tmp_path / "eval.json"
    assert main(["evaluate", str(folder), "--json", str(evaluated), *FAST]) == 0
    assert json.loads(evaluated.read_text())["dtype"] == "bfloat16"
