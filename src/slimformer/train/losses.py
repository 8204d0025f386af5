"""Distillation and training losses: pure functions on tensors.

Shapes: logits (..., V); hidden states (B, T, H); attention maps (B, heads, T, T); masks (B, T)
with 1 for real tokens and 0 for padding. Every loss averages over the unmasked positions only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimformer.errors import UserError

IGNORE = -100  # label of positions without a hard target (padding, no next token)


def check_kd(alpha: float, temperature: float) -> None:
    """UserError unless 0 <= alpha <= 1 and temperature is a finite number > 0."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"distillation temperature must be a finite number > 0 (1 = plain softmax, 2-4 is usual), got {temperature!r}.")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise UserError(f"distillation alpha must be in [0, 1] (weight of the teacher's soft loss; 1 - alpha weighs the hard labels), got {alpha!r}.")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `values` (...) over positions where `mask` (...) is nonzero; all positions without a mask."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over unmasked positions.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    check_kd(0.0, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ; student and teacher need the same vocabulary.")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (...,)
    return _masked_mean(kl, mask) * temperature**2


def hard_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with integer `labels` (...,), positions labelled IGNORE skipped."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, alpha: float,
                 temperature: float) -> Tensor:
    """alpha * kd_loss + (1 - alpha) * cross-entropy on the hard labels (IGNORE positions masked out)."""
    check_kd(alpha, temperature)
    if labels is None:
        if alpha < 1.0:
            raise UserError(f"distillation alpha {alpha} < 1 mixes in a hard-label loss, but the data has no labels.")
        return kd_loss(student_logits, teacher_logits, temperature)
    mask = labels != IGNORE
    soft = kd_loss(student_logits, teacher_logits, temperature, mask)
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * hard_loss(student_logits, labels)


def hidden_mse(student: Tensor, teacher: Tensor, proj: nn.Module | None = None, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states (B, T, Hs) -> proj -> (B, T, Ht) and (B, T, Ht),
    averaged over features and unmasked positions."""
    s = proj(student) if proj is not None else student
    if s.shape != teacher.shape:
        raise UserError(f"hidden-state loss: student states {tuple(s.shape)} vs teacher {tuple(teacher.shape)}; "
                        "widths differ, so a projection is needed.")
    return _masked_mean(((s.float() - teacher.float()) ** 2).mean(-1), mask)


def attention_kl(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) between attention distributions (B, heads, T, T) over the keys,
    averaged over heads and unmasked query positions (MiniLM / TinyBERT attention transfer).

    With different head counts the head-averaged maps are compared."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if student.shape != teacher.shape:
        raise UserError(f"attention loss: student maps {tuple(student.shape)} vs teacher {tuple(teacher.shape)}.")
    eps = torch.finfo(torch.float32).tiny
    t = teacher.float()
    kl = (t * (t.clamp_min(eps).log() - student.float().clamp_min(eps).log())).sum(-1)  # (B, heads, T)
    kl = kl.mean(1)  # (B, T)
    return _masked_mean(kl, mask)


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Uniform map: student block i (0-based) learns from teacher block round((i + 1) * n_t / n_s) - 1,
    so the last student block matches the last teacher block."""
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"layer map: a student with {n_student} blocks cannot follow a teacher with {n_teacher}; "
                        "the student must have between 1 and the teacher's number of blocks.")
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]
