"""Training recipe steps end to end through `slimformer.compress` on a tiny random Llama folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tiny import tiny_llama  # tests/tiny.py

import slimformer
from slimformer.errors import UserError
from slimformer.evaluate.measure import EvalSettings
from slimformer.models.zoo import resolve_alias
from slimformer.recipe import Recipe

EVAL = EvalSettings(max_windows=1, latency=False, progress=False)
TRAIN = {"steps": 5, "batch_size": 2, "seq_len": 32, "lr": 2e-2, "schedule": "constant"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(resolve_alias("smollm2-135m"), local_files_only=True)
    model = tiny_llama(None, vocab_size=tok.vocab_size, num_hidden_layers=4, max_position_embeddings=1024)
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_finetune_after_pruning_keeps_exact_zero_count(tiny_dir: Path) -> None:
    pruned = slimformer.compress(tiny_dir, {"steps": [{"method": "magnitude", "sparsity": 0.5}]}, eval=EVAL)
    tuned = slimformer.compress(tiny_dir, {"steps": [{"method": "magnitude", "sparsity": 0.5},
                                                     {"method": "finetune", **TRAIN}]}, eval=EVAL)
    zeros = pruned["compressed"]["params"] - pruned["compressed"]["nonzero_params"]
    assert zeros == 4 * (16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 32 * 16) // 2  # half of every block linear layer
    assert tuned["compressed"]["nonzero_params"] == pruned["compressed"]["nonzero_params"]
    assert tuned["compressed"]["ppl"] < pruned["compressed"]["ppl"]


def test_distill_into_a_two_block_student(tiny_dir: Path) -> None:
    report = slimformer.compress(tiny_dir, {"steps": [{"method": "distill", "student": {"every": 2}, "alpha": 1.0,
                                                       "hidden_weight": 1.0, "attention_weight": 1.0, **TRAIN}]}, eval=EVAL)
    step = report["steps"][0]
    assert step["student_layers"] == 2 and step["layer_map"] == [0, 2]
    assert report["compressed"]["params"] < report["baseline"]["params"] - 2 * 4 * 16 * 16
    assert step["loss_last"] < step["loss_first"]


@pytest.mark.parametrize("method", ["gradual", "l1"])
def test_sparsifying_training_reaches_exact_sparsity(tiny_dir: Path, method: str) -> None:
    extra = {"update_every": 1} if method == "gradual" else {"l1": 0.2}
    report = slimformer.compress(tiny_dir, {"steps": [{"method": method, "sparsity": 0.5, **extra, **TRAIN}]}, eval=EVAL)
    assert report["steps"][0]["sparsity"] == pytest.approx(0.5, abs=1e-6)
    if method == "l1":
        assert report["steps"][0]["sparsity_from_l1"] > 0.0


@pytest.mark.parametrize("step,match", [
    ({"method": "distill", "temperature": 0}, "temperature"),
    ({"method": "distill", "alpha": 2}, "alpha"),
    ({"method": "distill", "student": {"every": 0}}, "every"),
    ({"method": "finetune", "lr": -1}, "lr"),
    ({"method": "gradual", "sparsity": 1.0}, "sparsity"),
])
def test_bad_recipes(step: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        Recipe.from_dict({"steps": [step]})


def test_training_after_quantization_is_refused() -> None:
    with pytest.raises(UserError, match="after quantization"):
        Recipe.from_dict({"steps": [{"method": "rtn", "bits": 8}, {"method": "finetune"}]})


@pytest.mark.parametrize("name", ["finetune.yaml", "distill-neurons.yaml"])
def test_shipped_training_recipes_parse(name: str) -> None:
    recipe = Recipe.load(Path(__file__).parents[2] / "recipes" / name)
    assert recipe.steps[-1].config.steps >= 100


def test_encoder_finetune_trains_a_temporary_head(tmp_path: Path) -> None:
    """A bare BERT fine-tuned on labelled tweets: the head is trained with it and dropped after."""
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(resolve_alias("minilm-l6"), local_files_only=True)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=512)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    import json

    from slimformer.data.sources import load_data

    tweets = load_data("tweets", "calib")
    data = tmp_path / "tweets.jsonl"  # 90 labelled tweets: train on them, probe on a 2/3 - 1/3 split
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(tweets.texts[:90], tweets.labels[:90])))
    report = slimformer.compress(tmp_path / "bert", {"steps": [{"method": "finetune", "steps": 3, "batch_size": 8,
                                                                 "seq_len": 32, "lr": 1e-3}]}, calib=str(data),
                                 eval=EvalSettings(data=str(data), latency=False, progress=False))
    assert report["compressed"]["params"] == report["baseline"]["params"]  # no head left behind
    assert report["compressed"]["cosine"] < 0.9999  # the encoder itself changed
    assert report["steps"][0]["global_batch"] == 8
