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


def _compress_rtn(tmp_path: Path, model: Path, bits: int, name: str) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"steps:\n  - method: rtn\n    bits: {bits}\n    group_size: 32\n    symmetric: true\n")
    out = tmp_path / name
    assert main(["compress", str(model), "--recipe", str(recipe), "--output", str(out), "--no-latency",
                 "--max-windows", "1", "--quiet"]) == 0
    return out


def test_export_gguf_carries_codes_and_refuses_3_bit(tmp_path, tiny_dirs, capsys) -> None:
    from slimformer.export.gguf_parity import llama_cpp_available

    folder = _compress_rtn(tmp_path, tiny_dirs["llama"], 4, "q4")
    gguf_file, summary = tmp_path / "q4.gguf", tmp_path / "gguf.json"
    assert main(["export", str(folder), "--format", "gguf", "--output", str(gguf_file), "--json", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["tensors"]["Q4_0"] == result["layers_from_codes"] == 14  # 2 blocks x 7 linear layers
    assert result["bytes"] == gguf_file.stat().st_size
    if llama_cpp_available():  # llama.cpp ran the file: its logits match ours
        assert result["parity"]["cosine"] > 0.999
    else:
        assert result["parity"] is None and "not installed" in capsys.readouterr().out
    three = _compress_rtn(tmp_path, tiny_dirs["llama"], 3, "q3")
    assert main(["export", str(three), "--format", "gguf", "--output", str(tmp_path / "q3.gguf")]) == 2
    assert "3-bit" in capsys.readouterr().err and not (tmp_path / "q3.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_recipe_gguf_stage_is_written_and_measured(tmp_path, tiny_dirs, capsys) -> None:
    from slimformer.export.gguf_parity import llama_cpp_available

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - method: rtn\n    bits: 4\n    group_size: 32\n    symmetric: true\n"
                      "export:\n  format: gguf\n  unquantized: f16\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--output", str(out),
                 "--max-windows", "1", "--decode-context", "32", "--latency-seq", "16", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    stage = report["export"]
    assert (out / "model.gguf").is_file() and stage["file"] == "model.gguf" and stage["tensors"]["Q4_0"] == 14
    if llama_cpp_available():  # llama.cpp's perplexity on the same windows equals PyTorch's closely
        assert stage["parity"]["cosine"] > 0.999
        assert abs(stage["metrics"]["ppl"] / report["compressed"]["ppl"] - 1) < 0.01
        assert stage["metrics"]["decode_ms"] > 0 and stage["metrics"]["size_bytes"] == (out / "model.gguf").stat().st_size
    else:
        assert "not installed" in stage["note"] and "metrics" not in stage
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - method: rtn\nexport:\n  format: gguf\n  kv_cache: true\n")
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(bad), "--output", str(tmp_path / "o2")]) == 2
    assert "ONNX settings" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_export_compressed_tensors_and_refuse_float_minimum(tmp_path, tiny_dirs, capsys) -> None:
    folder = _compress_rtn(tmp_path, tiny_dirs["llama"], 4, "q4")
    out = tmp_path / "ct"
    assert main(["export", str(folder), "--format", "compressed-tensors", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    recipe = tmp_path / "fmin.yaml"
    recipe.write_text("steps:\n  - method: rtn\n    bits: 4\n    group_size: 32\n    zero_point: float\n")
    fmin = tmp_path / "fmin"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--output", str(fmin), "--no-latency",
                 "--max-windows", "1", "--quiet"]) == 0
    assert main(["export", str(fmin), "--format", "compressed-tensors", "--output", str(tmp_path / "ct2")]) == 2
    assert "float minimum" in capsys.readouterr().err and not (tmp_path / "ct2").exists()
