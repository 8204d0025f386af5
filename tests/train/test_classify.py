"""Encoder classification: a tiny BERT learns a planted rule; distillation transfers the teacher's logits."""

from __future__ import annotations

import torch
import transformers

from slimformer.train.classify import Classifier, fit, score, student_of
from slimformer.train.data import TrainData
from slimformer.train.task import TrainConfig


def _bert() -> transformers.BertModel:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def _data(n: int, seed: int) -> TrainData:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    ids = torch.randint(5, 30, (n, 8), generator=gen) + 20 * labels[:, None]  # class b draws from higher ids
    mask = torch.ones_like(ids)
    mask[: n // 2, 6:] = 0  # some padding
    return TrainData({"input_ids": ids, "attention_mask": mask, "labels": labels}, ("a", "b"))


def test_teacher_learns_and_student_distils() -> None:
    train_set, test_set = _data(128, 0), _data(64, 1)
    teacher = Classifier(_bert(), ("a", "b"), dropout=0.0)
    opts = TrainConfig(steps=15, lr=1e-2, batch_size=16, schedule="constant")
    fit(teacher, train_set, opts)
    acc = score(teacher, test_set)["accuracy"]
    assert acc >= 0.9
    student = student_of(teacher.encoder, [0, 2], ("a", "b"))
    assert len(student.encoder.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    info = fit(student, train_set, opts, teacher=teacher, alpha=0.9, temperature=2.0, hidden_weight=0.1,
               attention_weight=0.1, student_layers=[0, 2])
    assert info["layer_map"] == [0, 2]
    assert score(student, test_set)["accuracy"] >= acc - 0.1


def test_head_init_is_seeded_not_global() -> None:
    state = torch.random.get_rng_state()
    a, b, c = (Classifier(_bert(), ("a", "b"), seed=s) for s in (0, 0, 1))
    torch.manual_seed(123)  # the global RNG must not decide the head
    d = Classifier(_bert(), ("a", "b"), seed=0)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.weight, d.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert a.head.weight.abs().max().item() <= 16 ** -0.5  # nn.Linear's init range
    torch.random.set_rng_state(state)
