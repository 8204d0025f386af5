"""A damaged artifact through the CLI: exit 2, a message on stderr, no traceback."""

from __future__ import annotations

import json
from pathlib import Path


from slimformer.artifact import WEIGHTS
from slimformer.cli import main


def _evaluate(folder: Path) -> int:
    return main(["evaluate", str(folder), "--max-windows", "1", "--no-latency", "--quiet"])


def test_corrupted_weights_exit_2(artifact, capsys) -> None:
    assert _evaluate(artifact) == 0
    data = bytearray((artifact / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    (artifact / WEIGHTS).write_bytes(bytes(data))
    assert _evaluate(artifact) == 2
    err = capsys.readouterr().err
    assert "model.safetensors' is corrupted" in err and "re-create" in err and "Traceback" not in err


def test_damaged_tokenizer_is_reported_as_corruption(artifact, capsys) -> None:
    path = artifact / "tokenizer.json"
    path.write_text(path.read_text().replace('"', "'", 1))
    assert _evaluate(artifact) == 2
    assert "tokenizer.json' is corrupted" in capsys.readouterr().err


def test_newer_format_version_exit_2(artifact, capsys) -> None:
    from slimformer.artifact import MANIFEST_DIGEST, manifest_digest

    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["format_version"] = 7
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert _evaluate(artifact) == 2
    err = capsys.readouterr().err
    assert "version 7" in err and "up to 1" in err and "Traceback" not in err
