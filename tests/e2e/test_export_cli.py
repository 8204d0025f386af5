"""`slimformer export`: a compressed folder to ONNX, checked against PyTorch; bad input -> exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from slimformer.cli import main


def _compress_dynamic(tmp_path: Path, model: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - method: dynamic\n    activations: tensor\n")
    out = tmp_path / "dyn"
    assert main(["compress", str(model), "--recipe", str(recipe), "--output", str(out), "--no-latency",
                 "--quiet"]) == 0
    return out


def test_export_compressed_encoder(tmp_path, tiny_dirs, capsys) -> None:
    folder = _compress_dynamic(tmp_path, tiny_dirs["bert"])
    onnx_file, summary = tmp_path / "bert.onnx", tmp_path / "export.json"
    assert main(["export", str(folder), "--output", str(onnx_file), "--json", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["layers_swapped"] == 12 and result["bytes"] == onnx_file.stat().st_size
    assert result["parity"]["cosine"] > 0.999
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out


def test_export_decoder_fp32_matches(tmp_path, tiny_dirs) -> None:
    summary = tmp_path / "export.json"
    assert main(["export", str(tiny_dirs["llama"]), "--output", str(tmp_path / "llama.onnx"), "--json", str(summary)]) == 0
    parity = json.loads(summary.read_text())["parity"]
    assert parity["max_abs_err"] < 1e-4 and parity["cosine"] > 0.99999


def test_export_bad_inputs_exit_2(tmp_path, tiny_dirs, capsys) -> None:
    existing = tmp_path / "taken.onnx"
    existing.write_text("keep me")
    assert main(["export", str(tiny_dirs["bert"]), "--output", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main(["export", str(tmp_path / "nope"), "--output", str(tmp_path / "x.onnx")]) == 2
    assert main(["export", str(tiny_dirs["bert"]), "--output", str(tmp_path / "no" / "x.onnx")]) == 2
    assert main(["export", str(tiny_dirs["bert"]), "--output", str(tmp_path / "y.onnx"), "--threads", "0"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]
