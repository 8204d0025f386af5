"""Encoder classification on labelled texts (`tweets`): fine-tune an encoder + linear head, distil a
smaller student from it, and measure accuracy / macro precision, recall, F1 on a held-out split.

The classifier is the encoder with a linear head on the mask-weighted mean of its last hidden
state (the pooling the rest of slimformer uses for encoder embeddings).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from slimformer.data.sources import TextData
from slimformer.evaluate.classification import classification_metrics
from slimformer.evaluate.divergence import mean_pool
from slimformer.train.data import TrainData, classification_data
from slimformer.train.loop import train
from slimformer.train.student import drop_layers
from slimformer.train.task import TrainConfig
from slimformer.train.tasks import DistillTask, SupervisedTask


class Classifier(nn.Module):
    """encoder -> mean pool over real tokens -> dropout -> linear head: logits (B, classes)."""

    def __init__(self, encoder: nn.Module, classes: tuple[str, ...], dropout: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.classes = tuple(classes)
        self.dropout = nn.Dropout(dropout)
        width = int(encoder.config.hidden_size)
        self.head = nn.Linear(width, len(classes))
        # nn.Linear's own init range, drawn from a private generator: the same head on every run,
        # without touching the global RNG
        gen, bound = torch.Generator().manual_seed(seed), width ** -0.5
        for param in (self.head.weight, self.head.bias):
            nn.init.uniform_(param, -bound, bound, generator=gen)

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, **_: Any) -> SequenceClassifierOutput:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions)
        logits = self.head(self.dropout(mean_pool(out.last_hidden_state, attention_mask)))  # (B, classes)
        return SequenceClassifierOutput(logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


def fit(model: nn.Module, data: TrainData, options: TrainConfig, teacher: nn.Module | None = None,
        **distill: Any) -> dict[str, Any]:
    """Train a Classifier in place: cross-entropy, or distillation from `teacher` (DistillTask keys)."""
    task = DistillTask(teacher, **distill) if teacher is not None else SupervisedTask()
    trained, info = train(model, task, data, options)
    if trained is not model:
        model.load_state_dict(trained.state_dict())
    model.eval()
    return info


@torch.inference_mode()
def predict(model: Classifier, data: TrainData, batch_size: int = 64) -> Tensor:
    """Class indices (N,) for every example."""
    model.eval()
    out = []
    ids, mask = data.tensors["input_ids"], data.tensors["attention_mask"]
    for s in range(0, len(data), batch_size):
        m = mask[s:s + batch_size]
        length = int(m.sum(1).max())
        out.append(model(ids[s:s + batch_size, :length], m[:, :length]).logits.argmax(-1))
    return torch.cat(out)


def score(model: Classifier, data: TrainData) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 on labelled `data`."""
    return classification_metrics(data.tensors["labels"].tolist(), predict(model, data).tolist())


def student_of(encoder: nn.Module, keep: list[int], classes: tuple[str, ...], seed: int = 0) -> Classifier:
    """A Classifier over a copy of `encoder` that keeps only blocks `keep`, with a fresh (seeded) head."""
    return Classifier(drop_layers(copy.deepcopy(encoder), keep), classes, seed=seed)


def splits(tokenizer: Any, train_texts: TextData, test_texts: TextData, max_length: int = 64) -> tuple[TrainData, TrainData]:
    """Tokenized train and test sets with one shared class order (taken from the training labels)."""
    tr = classification_data(tokenizer, train_texts, max_length)
    return tr, classification_data(tokenizer, test_texts, max_length, classes=tr.classes)
