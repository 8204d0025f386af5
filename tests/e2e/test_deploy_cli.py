"""Deployment through the CLI: `export --format hf`, `bench`; bad input -> exit 2."""

from __future__ import annotations

import json

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


def test_bench_compare_torch_and_onnx(tmp_path, tiny_dirs, capsys) -> None:
    onnx_file, summary = tmp_path / "llama.onnx", tmp_path / "bench.json"
    assert main(["export", str(tiny_dirs["llama"]), "--output", str(onnx_file)]) == 0
    assert main(["bench", str(tiny_dirs["llama"]), str(onnx_file), "--runtime", "onnxruntime", "--runs", "3",
                 "--warmup", "1", "--seq", "16", "--prefill", "16", "--compare", "--json", str(summary)]) == 0
    out = capsys.readouterr().out
    assert "forward median (ms)" in out and "ratio to the first column" in out
    first, second = json.loads(summary.read_text())["results"]
    assert first["decode"]["runs"] == 3  # the folder is exported with a key/value cache
    assert "decode" not in second and "re-export" in second["decode_note"]  # a plain export has none
    kv_file = tmp_path / "llama-kv.onnx"
    assert main(["export", str(tiny_dirs["llama"]), "--output", str(kv_file), "--kv-cache", "--json", str(summary)]) == 0
    assert json.loads(summary.read_text())["parity"]["max_abs_err"] < 1e-4
    assert main(["bench", str(kv_file), "--runtime", "onnxruntime", "--runs", "2", "--prefill", "8", "--seq", "8",
                 "--json", str(summary)]) == 0
    assert json.loads(summary.read_text())["results"][0]["decode"]["context"] == 8
    assert main(["export", str(tiny_dirs["bert"]), "--output", str(tmp_path / "b.onnx"), "--kv-cache"]) == 2


def test_bench_encoder_torch(tmp_path, tiny_dirs, capsys) -> None:
    assert main(["bench", str(tiny_dirs["bert"]), "--runs", "2", "--warmup", "0", "--batch", "4", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "forward tokens/s" in out and "decode" not in out


def test_bench_bad_inputs_exit_2(tmp_path, tiny_dirs, capsys) -> None:
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not onnx")
    cases = [
        [str(tmp_path / "missing")],
        [str(tiny_dirs["llama"]), "--batch", "0"],
        [str(fake)],  # not a model either (an .onnx file runs in onnxruntime whatever --runtime says)
        [str(fake), "--runtime", "onnxruntime"],  # not a model
        [str(tmp_path / "missing.onnx"), "--runtime", "onnxruntime"],
        [str(tiny_dirs["llama"]), "--json", str(tmp_path / "no" / "b.json")],
    ]
    for args in cases:
        assert main(["bench", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("slimformer: error:") and "Traceback" not in err, err
