"""Hostile and broken inputs through the CLI: no foreign code runs, no input is destroyed, no weight
is invented, and each is exit 2 with one message, nothing left on disk, the input's files unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimformer.artifact import MANIFEST_DIGEST, manifest_digest
from slimformer.cli import main
from slimformer.outputs import OutputLock

RTN = "steps:\n  - method: rtn\n    bits: 4\n    group_size: 32\n"
FAST = ["--max-windows", "1", "--no-latency", "--quiet"]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args: str, stdin: str = "", env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command in a fresh process (stdin answered, as a person at a terminal might)."""
    return subprocess.run([sys.executable, "-m", "slimformer", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _recipe(tmp_path: Path, text: str = RTN) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refused(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def _reseal(folder: Path) -> None:
    """Re-record every file's sha256 and the manifest's digest, as a tamperer who knows the format would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in manifest["sha256"]}
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _plant_code(folder: Path, marker: Path) -> None:
    """A config with an unknown model_type whose auto_map points at a file that writes `marker`."""
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evilmodel"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")


# 1. code in a model folder never runs, even with 'y' on stdin
@pytest.mark.parametrize("command", ["evaluate", "compress"])
def test_custom_code_in_hf_folder_never_runs(tmp_path, tiny_dirs, command) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "evil")
    marker = tmp_path / "MARKER"
    _plant_code(folder, marker)
    before = _hashes(folder)
    extra = ["--recipe", str(_recipe(tmp_path)), "--output", str(tmp_path / "out")] if command == "compress" else []
    done = _cli(command, str(folder), *extra, *FAST, stdin="y\n" * 10)
    _refused(done, "custom Python code")
    assert not marker.exists() and not (tmp_path / "out").exists() and _hashes(folder) == before


def test_custom_code_in_resealed_artifact_never_runs(tmp_path, artifact) -> None:
    marker = tmp_path / "MARKER"
    _plant_code(artifact, marker)
    _reseal(artifact)
    done = _cli("evaluate", str(artifact), *FAST, stdin="y\n" * 10)
    _refused(done, "custom Python code")
    code = ("import slimformer, sys\ntry:\n    slimformer.load(sys.argv[1])\nexcept slimformer.UserError as e:\n"
            "    print('refused:', e)\n")
    loaded = subprocess.run([sys.executable, "-c", code, str(artifact)], input="y\n" * 10, capture_output=True,
                            text=True, timeout=120)
    assert "refused:" in loaded.stdout and "custom Python code" in loaded.stdout, loaded.stderr
    assert not marker.exists()


def test_custom_tokenizer_code_never_runs(tmp_path, tiny_dirs) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "evil")
    marker = tmp_path / "MARKER"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    done = _cli("evaluate", str(folder), *FAST, stdin="y\n" * 10)
    _refused(done, "custom Python code")
    assert not marker.exists()


# 2. an output that is, holds or lies inside the input (or the model cache) is refused
@pytest.mark.parametrize("where", ["input", "parent", "inside", "cache"])
def test_output_over_input_is_refused(tmp_path, tiny_dirs, where) -> None:
    from slimformer.models.zoo import cache_dir

    folder = _copy(tiny_dirs["llama"], tmp_path / "model")
    out = {"input": folder, "parent": tmp_path, "inside": folder / "sub", "cache": cache_dir() / "x"}[where]
    before, listing = _hashes(folder), sorted(p.name for p in tmp_path.iterdir())
    code = main(["compress", str(folder), "--recipe", str(_recipe(tmp_path)), "--output", str(out),
                 "--overwrite", *FAST])
    assert code == 2
    assert _hashes(folder) == before and not (cache_dir() / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == listing + (["recipe.yaml"] if "recipe.yaml" not in listing else [])


def test_export_into_the_input_is_refused(tmp_path, tiny_dirs, capsys) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "model")
    before = _hashes(folder)
    assert main(["export", str(folder), "--output", str(folder / "model.onnx")]) == 2
    assert main(["export", str(folder), "--format", "hf", "--output", str(folder), "--overwrite"]) == 2
    assert "inside the input model" in capsys.readouterr().err
    assert _hashes(folder) == before


# 3. no weight is invented: a missing manifest or a missing tensor is refused
def test_artifact_without_manifest_is_incomplete(artifact, capsys) -> None:
    (artifact / "manifest.json").unlink()
    assert main(["evaluate", str(artifact), *FAST]) == 2
    assert "incomplete slimformer artifact" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "compress"])
def test_hf_folder_missing_a_weight_is_refused(tmp_path, tiny_dirs, capsys, command) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "model")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    extra = ["--recipe", str(_recipe(tmp_path)), "--output", str(tmp_path / "out")] if command == "compress" else []
    assert main([command, str(folder), *extra, *FAST]) == 2
    err = capsys.readouterr().err
    assert "missing 1 (model.layers.1.mlp.up_proj.weight)" in err and "at random" in err
    assert not (tmp_path / "out").exists()


def test_hf_folder_with_an_unexpected_weight_is_refused(tmp_path, tiny_dirs, capsys) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "model")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert main(["evaluate", str(folder), *FAST]) == 2
    assert "unexpected 1 (model.layers.1.mlp.extra.weight)" in capsys.readouterr().err


# 4. a manifest without its digest is refused, unless explicitly allowed
def test_manifest_without_digest_needs_opt_in(tmp_path, artifact) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    del manifest[MANIFEST_DIGEST]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    _refused(_cli("evaluate", str(artifact), *FAST), "records no manifest_sha256")
    allowed = _cli("evaluate", str(artifact), *FAST, env={"SLIMFORMER_ALLOW_UNSEALED": "1"})
    assert allowed.returncode == 0 and "loaded unchecked" in allowed.stderr, allowed.stderr


# 5. one run per output: a second run against a running one's output exits 2
def test_second_run_on_a_locked_output_exits_2(tmp_path, tiny_dirs) -> None:
    out = tmp_path / "out"
    with OutputLock(out):  # the lock a running compress holds for its whole run
        done = _cli("compress", str(tiny_dirs["llama"]), "--recipe", str(_recipe(tmp_path)), "--output", str(out), *FAST)
    _refused(done, "being written by another slimformer run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# 6. damaged weights: a truncated safetensors file, a damaged block checkpoint under --resume
def test_truncated_safetensors_exit_2(tmp_path, tiny_dirs, capsys) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["evaluate", str(folder), *FAST]) == 2
    assert "model.safetensors' is truncated or damaged" in capsys.readouterr().err


def test_damaged_block_checkpoint_under_resume_exit_2(tmp_path, tiny_dirs) -> None:
    """A real interrupted run (Ctrl-C during a long second step) keeps its finished SparseGPT blocks; one
    of them damaged, --resume is refused before any measurement."""
    recipe = _recipe(tmp_path, "steps:\n  - method: sparsegpt\n    sparsity: 0.5\n    num_samples: 2\n    bits: 4\n    group_size: 32\n"
                               "    seq_len: 64\n  - method: finetune\n    steps: 100000\n    seq_len: 64\n")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "slimformer", "compress", str(tiny_dirs["llama"]), "--recipe", str(recipe),
            "--output", str(out), "--no-step-metrics", *FAST]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    block = tmp_path / ".out.resume" / "step0" / "block_1.json"
    deadline = time.monotonic() + 240
    while not block.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    run.send_signal(signal.SIGINT)
    try:
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:  # not stopped by the interrupt: the failure must not leave it training
            run.kill()
            run.communicate()
    assert run.returncode == 130 and block.exists(), err
    weights = block.with_name("block_0.safetensors")
    weights.write_bytes(weights.read_bytes()[:-16])
    started = time.perf_counter()
    done = _cli(*args[3:], "--resume")
    _refused(done, "is damaged")
    assert time.perf_counter() - started < 60 and not out.exists()


# 7. an unknown model_type inside an artifact
def test_unknown_model_type_in_artifact_exit_2(artifact, capsys) -> None:
    config = json.loads((artifact / "config.json").read_text())
    config["model_type"] = "nosuchmodel"
    (artifact / "config.json").write_text(json.dumps(config))
    _reseal(artifact)
    assert main(["evaluate", str(artifact), *FAST]) == 2
    assert "config.json could not be read" in capsys.readouterr().err


# 8. unwritable output locations, found at argument time; a full disk says how much is needed
def _mount_tmpfs(point: Path, *options: str) -> None:
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=2m", *options]), "tmpfs", str(point)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("needs to mount a small tmpfs (root)")


@pytest.fixture
def small_disk(tmp_path):
    point = tmp_path / "small"
    _mount_tmpfs(point)
    yield point
    subprocess.run(["umount", str(point)], check=True)


def test_unwritable_output_is_found_before_loading(tmp_path, tiny_dirs, small_disk) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for out in (small_disk / "out", Path("/proc/slimformer-test/out")):
        started = time.perf_counter()
        done = _cli("compress", str(tiny_dirs["llama"]), "--recipe", str(_recipe(tmp_path)), "--output", str(out), *FAST)
        _refused(done, "cannot write in")
        assert time.perf_counter() - started < 20  # no model was loaded or measured


def test_disk_full_says_how_much_is_needed(tmp_path, tiny_dirs, small_disk) -> None:
    done = _cli("compress", str(tiny_dirs["llama"]), "--recipe", str(_recipe(tmp_path)), "--output",
                str(small_disk / "out"), *FAST)
    _refused(done, "no space left on the device")
    assert "MB are free" in done.stderr and list(small_disk.iterdir()) == []


# 9. --json in a missing folder: refused before the work, nothing written
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_json_in_missing_folder_exit_2_before_work(tmp_path, tiny_dirs, capsys, command) -> None:
    extra = ["--output", str(tmp_path / "m.onnx")] if command == "export" else ["--no-latency", "--quiet"]
    assert main([command, str(tiny_dirs["llama"]), *extra, "--json", str(tmp_path / "nope" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# 11. a group wider than the layers is refused with the other recipe checks, before the baseline
def test_group_size_larger_than_layer_exit_2(tmp_path, tiny_dirs, capsys) -> None:
    recipe = _recipe(tmp_path, "steps:\n  - method: rtn\n    bits: 4\n    group_size: 100000\n")
    started = time.perf_counter()
    code = main(["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--output", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "group_size 100000 is larger than layer" in err and "32 inputs" in err
    assert time.perf_counter() - started < 10 and not (tmp_path / "o").exists()


# 12. nothing left behind: no checkpoint folder for rtn, stale temporary siblings cleaned
def test_stale_siblings_are_cleaned_and_rtn_leaves_no_checkpoint(tmp_path, tiny_dirs) -> None:
    stale = tmp_path / ".out.tmp-abcd1234"  # what a run killed during its final write leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / ".other.tmp-abcd1234"  # another output's: not ours to remove
    other.mkdir()
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(_recipe(tmp_path)), "--output", str(out),
                 *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-abcd1234", "out", "recipe.yaml"]


def test_failed_run_leaves_no_checkpoint(tmp_path, tiny_dirs, small_disk) -> None:
    """A layer-wise step that fails (here: the disk fills before its first block is saved) leaves no
    `.NAME.resume` folder."""
    recipe = _recipe(tmp_path, "steps:\n  - method: gptq\n    bits: 4\n    group_size: 32\n    num_samples: 2\n"
                               "    seq_len: 64\n")
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # fill the disk to the last block
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass
    done = _cli("compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--output", str(small_disk / "out"), *FAST)
    assert done.returncode == 2, done.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# 15. messages that name the real problem
def test_file_as_output_says_it_is_a_file(tmp_path, tiny_dirs, capsys) -> None:
    target = tmp_path / "empty"
    target.write_text("")
    assert main(["compress", str(tiny_dirs["llama"]), "--recipe", str(_recipe(tmp_path)), "--output", str(target),
                 *FAST]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and target.read_text() == ""


def test_invalid_config_json_is_reported_as_such(tmp_path, tiny_dirs, capsys) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "model")
    (folder / "config.json").write_text('{"model_type": "llama",')
    assert main(["evaluate", str(folder), *FAST]) == 2
    err = capsys.readouterr().err
    assert "config.json' is not valid JSON" in err and "tokenizer" not in err


def test_regular_file_as_model_is_called_a_file(tmp_path, tiny_dirs, capsys) -> None:
    assert main(["evaluate", str(tiny_dirs["llama"] / "model.safetensors"), *FAST]) == 2
    assert "is a file; expected a Hugging Face model folder" in capsys.readouterr().err


def test_pickled_weights_are_never_loaded(tmp_path, tiny_dirs, capsys) -> None:
    folder = _copy(tiny_dirs["llama"], tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert main(["evaluate", str(folder), *FAST]) == 2
    assert "pickle files, which slimformer never loads" in capsys.readouterr().err
