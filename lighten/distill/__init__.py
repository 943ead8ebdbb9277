"""Knowledge distillation: losses that let a teacher model guide a student's training."""

from lighten.distill.losses import soft_target_loss, teacher_term

__all__ = ["soft_target_loss", "teacher_term"]
