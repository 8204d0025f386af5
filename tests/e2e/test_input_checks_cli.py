"""Bad input met through the CLI: exit 2, a message naming the problem, nothing written."""

from __future__ import annotations

import random
import time

import pytest

from slimformer.cli import main

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
steps: [*i]
"""


def test_yaml_alias_bomb_is_refused_fast(tmp_path, capsys) -> None:
    recipe, out = tmp_path / "bomb.yaml", tmp_path / "out"
    recipe.write_text(BOMB)
    started = time.perf_counter()
    code = main(["compress", "smollm2-135m", "--recipe", str(recipe), "--output", str(out)])
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2 and "anchors/aliases" in err and len(err) < 400, err
    assert seconds < 10 and not out.exists()


def test_folder_as_recipe_says_folder(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["compress", "smollm2-135m", "--recipe", str(tmp_path), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder, not a recipe file" in err and not out.exists()


def test_binary_eval_file_is_not_text(tmp_path, capsys) -> None:
    noise = tmp_path / "random.txt"
    noise.write_bytes(random.Random(0).randbytes(8192))
    report = tmp_path / "eval.json"
    code = main(["evaluate", "smollm2-135m", "--eval", str(noise), "--no-latency", "--max-windows", "1", "--quiet",
                 "--json", str(report)])
    err = capsys.readouterr().err
    assert code == 2 and "random.txt' is not UTF-8 text" in err and not report.exists(), err


@pytest.mark.parametrize("method", ["gptq", "wanda"])
def test_too_short_calibration_text_says_calibration(tmp_path, tiny_dirs, capsys, method) -> None:
    recipe, calib, out = tmp_path / "recipe.yaml", tmp_path / "tiny.txt", tmp_path / "out"
    recipe.write_text(f"steps:\n  - method: {method}\n" + ("    sparsity: 0.5\n" if method == "wanda" else "    group_size: 32\n"))
    calib.write_text("only a few words")
    code = main(["compress", str(tiny_dirs["llama"]), "--recipe", str(recipe), "--calib", str(calib), "--output", str(out),
                 "--no-latency", "--max-windows", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "calibration text too short for one window" in err and "evaluation" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "tiny.txt"]
