"""Training tasks: supervised (causal-LM next token, or classification) and distillation.

A model's "logits" are its own (`CausalLM`, a classifier) or, for a bare encoder (`BertModel`),
those of a linear head on the mean-pooled last hidden state, trained with it (`extras["head"]`)
and dropped afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slimformer.errors import UserError
from slimformer.evaluate.divergence import mean_pool
from slimformer.train.losses import IGNORE, attention_kl, distill_loss, hard_loss, hidden_mse, layer_map
from slimformer.train.task import TrainTask


def _call(model: nn.Module, batch: dict[str, Tensor], hidden: bool = False, attentions: bool = False) -> Any:
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if hasattr(model, "generate"):
        kwargs["use_cache"] = False
    if hidden:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    return model(**kwargs)


class SupervisedTask(TrainTask):
    """Next-token cross-entropy (LM windows) or class cross-entropy (batches with `labels`)."""

    def __init__(self, n_classes: int = 0, hidden_size: int = 0) -> None:
        super().__init__()
        if n_classes and hidden_size:
            self.extras["head"] = nn.Linear(hidden_size, n_classes)

    def logits(self, out: Any, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, V) LM logits or (B, C) class logits."""
        logits = getattr(out, "logits", None)
        if logits is not None:
            return logits
        if "head" not in self.extras:
            raise UserError("this model has no output head and the data no labels: give labelled data "
                            "(a .jsonl/.csv with 'label') to train an encoder.")
        return self.extras["head"](mean_pool(out.last_hidden_state, batch.get("attention_mask")))

    @staticmethod
    def targets(logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(logits, labels) aligned: LM logits shifted to predict the next token."""
        if "labels" in batch:
            return logits, batch["labels"]
        labels = batch["input_ids"][:, 1:]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE)
        return logits[:, :-1], labels

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits, labels = self.targets(self.logits(_call(model, batch), batch), batch)
        loss = hard_loss(logits, labels)
        return loss, {"ce": float(loss.detach())}


class DistillTask(SupervisedTask):
    """alpha * T^2 KL(teacher || student) + (1 - alpha) * CE, plus hidden-state MSE (through a learned
    projection when widths differ) and attention-map KL on mapped blocks, each with its weight.

    `student_layers[i]` is the teacher block that student block i learns from (default: uniform).
    For a head-less encoder the teacher's output is its last hidden state: the soft term is their MSE.
    """

    def __init__(self, teacher: nn.Module, *, alpha: float = 0.5, temperature: float = 2.0, hidden_weight: float = 0.0,
                 attention_weight: float = 0.0, student_layers: list[int] | None = None, n_classes: int = 0,
                 hidden_size: int = 0) -> None:
        super().__init__(n_classes, hidden_size)
        self.teacher = teacher
        self.alpha, self.temperature = alpha, temperature
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        self.student_layers = student_layers
        self._attn: tuple[str, str] | None = None  # (teacher, student) implementations before `prepare`

    def prepare(self, model: nn.Module) -> nn.Module:
        from slimformer.train import dist

        self.teacher.to(dist.device()).eval()
        n_s, n_t = _n_layers(model), _n_layers(self.teacher)
        self.map = list(self.student_layers) if self.student_layers is not None else layer_map(n_s, n_t)
        if len(self.map) != n_s or not all(0 <= t < n_t for t in self.map):
            raise UserError(f"distill: the layer map {self.map} must give one teacher block (0..{n_t - 1}) per student block ({n_s}).")
        w_s, w_t = _width(model), _width(self.teacher)
        if self.hidden_weight > 0 and w_s != w_t:
            if w_s > w_t:
                raise UserError(f"distill: the student is wider than its teacher (hidden {w_s} > {w_t}); "
                                "hidden-state transfer needs a student no wider than the teacher.")
            self.extras["proj"] = nn.Linear(w_s, w_t, bias=False)
        if self.attention_weight > 0:  # attention maps are only returned by the eager implementation
            self._attn = (_set_eager(self.teacher), _set_eager(model))
        return model

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        want_h, want_a = self.hidden_weight > 0, self.attention_weight > 0
        with torch.no_grad():
            t_out = _call(self.teacher, batch, want_h, want_a)
        s_out = _call(model, batch, want_h, want_a)
        mask = batch.get("attention_mask")
        logs: dict[str, float] = {}
        if getattr(t_out, "logits", None) is None:  # head-less encoder: match the output states
            loss = self.alpha * hidden_mse(s_out.last_hidden_state, t_out.last_hidden_state, self.extras["proj"]
                                           if "proj" in self.extras else None, mask)
            if self.alpha < 1 and "labels" in batch:
                loss = loss + (1 - self.alpha) * hard_loss(self.logits(s_out, batch), batch["labels"])
        else:
            s_logits, labels = self.targets(self.logits(s_out, batch), batch)
            t_logits, _ = self.targets(t_out.logits, batch)
            loss = distill_loss(s_logits, t_logits, labels, self.alpha, self.temperature)
        logs["kd"] = float(loss.detach())
        if want_h:  # hidden_states[0] is the embedding output; block i's output is [i + 1]
            proj = self.extras["proj"] if "proj" in self.extras else None
            h = sum(hidden_mse(s_out.hidden_states[i + 1], t_out.hidden_states[t + 1], proj, mask)
                    for i, t in enumerate(self.map)) / len(self.map)
            loss = loss + self.hidden_weight * h
            logs["hidden"] = float(h.detach())
        if want_a:
            a = sum(attention_kl(s_out.attentions[i], t_out.attentions[t], mask) for i, t in enumerate(self.map)) / len(self.map)
            loss = loss + self.attention_weight * a
            logs["attention"] = float(a.detach())
        return loss, logs

    def finish(self, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        if self._attn is not None:  # back to the (fused) implementations the models had
            _set_attn(self.teacher, self._attn[0])
            _set_attn(model, self._attn[1])
        self.teacher.cpu()
        return model, {"layer_map": self.map}


def _n_layers(model: nn.Module) -> int:
    from slimformer.models.layout import find_blocks

    return len(find_blocks(model)[1])


def _width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _set_eager(model: nn.Module) -> str:
    before = getattr(model.config, "_attn_implementation", None) or "eager"
    _set_attn(model, "eager")
    return before


def _set_attn(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
