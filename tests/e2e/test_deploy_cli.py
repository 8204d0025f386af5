"""Deployment through the CLI: `export --format hf`, `bench`; bad input -> exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from slimformer.cli import main


def test_export_hf_folder(tmp_path, tiny_dirs, capsys) -> None:
    out, summary = tmp_path / "plain", tmp_path / "hf.json"
    assert main(["export", str(tiny_dirs["llama"]), "--format", "hf", "--output", str(out), "--dtype", "float16",
                 "--json", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["dtype"] == "float16" and result["parity"]["cosine"] > 0.999
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype.itemsize == 2
    assert "plain transformers vs slimformer" in capsys.readouterr().out
    assert main(["export", str(tiny_dirs["llama"]), "--format", "hf", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_dirs["llama"]), "--format", "hf", "--output", str(tmp_path / "a" / "b")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf.json", "plain"]
