"""Knowledge distillation: teachers guide students (the ``distill`` step) and any step's
``finetune:`` (distillation as recovery).

losses.py (the registered losses), features.py (hooks, layer matching, adapters), heads.py
(exit heads, multi-task heads), models.py (teacher / student references), objective.py (one
training objective), step.py (the ``distill`` step), mutual.py, multitask.py, recovery.py.
"""

from lighten.distill.losses import (
                                    LOSSES,
                                    attention_loss,
                                    dkd_loss,
                                    hint_loss,
                                    hinton_loss,
                                    register_loss,
                                    rkd_loss,
                                    soft_target_loss,
                                    teacher_term,
)

__all__ = ["LOSSES", "attention_loss", "dkd_loss", "hint_loss", "hinton_loss", "register_loss",
           "rkd_loss", "soft_target_loss", "teacher_term"]
