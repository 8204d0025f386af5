"""Recipe parsing and validation: every bad input is a UserError naming where it is."""

from __future__ import annotations

import pytest

from slimformer.errors import UserError
from slimformer.recipe import Recipe

GOOD = """
steps:
  - method: magnitude
    sparsity: 0.5
    scope: global
    targets: ["re:.*mlp.*"]
  - method: rtn
    bits: 4
    group_size: 128
"""


def test_round_trip() -> None:
    recipe = Recipe.from_yaml(GOOD)
    assert [s.method for s in recipe.steps] == ["magnitude", "rtn"]
    assert recipe.steps[0].config.sparsity == 0.5 and recipe.steps[0].config.targets == ("re:.*mlp.*",)
    assert recipe.steps[1].config.symmetric is False  # default
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: [", "not valid YAML"),
        ("- method: rtn", "expected a mapping with the key 'steps'"),
        ("steps: []", "non-empty list"),
        ("steps:\n  - bits: 4", "'method' key"),
        ("steps:\n  - method: nope", "unknown method 'nope'"),
        ("steps:\n  - method: rtn\n    bitz: 4", "unknown key"),
        ("steps:\n  - method: rtn\n    bits: 1", "bits must be an integer from 2 to 8"),
        ("steps:\n  - method: rtn\n    bits: 9", "bits must be an integer from 2 to 8"),
        ("steps:\n  - method: rtn\n    bits: 4.5", "expected an integer"),
        ("steps:\n  - method: rtn\n    group_size: -2", "group_size"),
        ("steps:\n  - method: magnitude\n    sparsity: 1.0", r"sparsity must be in \[0.0, 1.0\)"),
        ("steps:\n  - method: magnitude\n    sparsity: -0.1", "sparsity must be in"),
        ("steps:\n  - method: magnitude", "exactly one of"),
        ("steps:\n  - method: magnitude\n    sparsity: 0.1\n    scope: row", "expected one of"),
        ("steps:\n  - method: rtn\n  - method: magnitude\n    sparsity: 0.1", "prunes after quantization"),
    ],
)
def test_bad_recipes(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Recipe.from_yaml(text)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Recipe.load(tmp_path / "none.yaml")


def test_shipped_recipes_are_valid() -> None:
    from pathlib import Path

    shipped = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        assert Recipe.load(path).steps, path


def test_export_stage_round_trips_and_defaults() -> None:
    recipe = Recipe.from_yaml(GOOD + "export:\n  int4_compute: int8\n")
    assert recipe.export is not None and recipe.export.format == "onnx" and recipe.export.int4_compute == "int8"
    assert recipe.export.kv_cache is False
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_yaml(GOOD + "export: true\n").export == Recipe.from_yaml(GOOD + "export: {}\n").export
    assert Recipe.from_yaml(GOOD).export is None and "export" not in Recipe.from_yaml(GOOD).to_dict()


BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9 if prev else ['lol'] * 9)}]\n"
    for prev, name in zip(" abcdefgh", "abcdefghi")
) + "steps: [*i]\n"  # "billion laughs": 9**9 strings once expanded


def test_anchors_and_aliases_are_refused() -> None:
    with pytest.raises(UserError, match=r"anchors/aliases \(&/\*\)"):
        Recipe.from_yaml(BOMB)
    with pytest.raises(UserError, match="anchors/aliases"):
        Recipe.from_yaml("steps:\n  - &q {method: rtn}\n")  # an anchor alone, too


def test_directory_as_recipe_says_folder(tmp_path) -> None:
    with pytest.raises(UserError, match="is a folder, not a recipe file"):
        Recipe.load(tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        {"steps": [{"method": "rtn", "bits": list(range(10**6))}]},
        {"steps": [{"method": "rtn", "group_size": "x" * 10**6}]},
        {"steps": [{"method": "magnitude", "sparsity": 0.1, "scope": [[list(range(1000))] * 1000]}]},
        {"steps": [{"method": "rtn", **{f"key{i}" * 100: 1 for i in range(1000)}}]},
        {"steps": list(range(10**6))},
        {"steps": [{"method": list(range(10**6))}]},
        {"steps": [{"method": "rtn"}], "export": list(range(10**6))},
        {i: i for i in range(10**6)},
    ],
)
def test_huge_values_give_short_messages(data) -> None:
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(data)
    assert len(str(caught.value)) < 300, str(caught.value)


def test_apply_runs_the_steps_in_order_and_reports_each() -> None:
    from tiny import tiny_llama  # tests/tiny.py

    model = tiny_llama()
    recipe = Recipe.from_yaml("steps: [{method: magnitude, sparsity: 0.5}, {method: rtn, bits: 4, group_size: 16}]")
    seen: list[int] = []
    infos = recipe.apply(model, None, after_step=lambda i, info: seen.append(i))
    assert seen == [0, 1] and [i["method"] for i in infos] == ["magnitude", "rtn"]
    assert infos[0]["sparsity"] == 0.5 and infos[1]["bits"] == 4 and all(i["wall_s"] >= 0 for i in infos)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "QuantLinear"
    assert int((layer.dequantized_weight() == 0).sum()) >= layer.in_features * layer.out_features // 2
