"""Soft-target distillation (Hinton et al. 2015) as a loss term for the shared training loop.

Any step's ``finetune: {distill: 0.5}`` uses it with the recipe's baseline as the teacher: a
pruned or quantized model recovers faster when it matches the dense model's whole output
distribution, not only the labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lighten.errors import ModelError


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` keeps gradient magnitudes comparable to cross-entropy whatever ``T`` is.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ModelError(f"teacher outputs {tuple(teacher_logits.shape)} but the student "
                         f"{tuple(student_logits.shape)}; distillation needs the same classes")
    t = temperature
    classes = student_logits.shape[-1]  # (B, C), or (B, T, V) per token: one row per position
    log_student = F.log_softmax(student_logits.reshape(-1, classes) / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.reshape(-1, classes) / t, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * t * t


def teacher_term(teacher: nn.Module, *, weight: float, temperature: float):
    """A ``LossTerm`` adding ``weight * soft_target_loss``; the teacher is frozen in eval mode."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def term(model: nn.Module, x: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            target = teacher(*x) if isinstance(x, tuple) else teacher(x)  # multi-input: tuple
        return weight * soft_target_loss(logits, target, temperature)

    return term
