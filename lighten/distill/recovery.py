"""Distillation as recovery: any step's ``finetune:`` may learn from a teacher.

``finetune: {distill: 0.5}`` (unchanged) adds 0.5 x the soft-target term ``T^2 KL`` from the
recipe's baseline to the task loss. ``teacher:`` names another teacher (any
:mod:`lighten.distill.models` reference; ``distill`` then defaults to 0.5) and ``loss:`` another
loss (``dkd``, ``hint``, ``attention``, ``relational``; ``hinton`` is the soft-target term) or a
mapping ``{name: weight}`` that replaces ``distill`` as the weights.
"""

from __future__ import annotations

from typing import Any

from lighten.distill.losses import LOSSES, LossParams, get_loss
from lighten.errors import LightenError

DEFAULT_WEIGHT = 0.5
_LABEL_LOSSES = ("hinton",)  # names that would count the labels twice next to the task loss


def check_finetune_fields(data: dict, context: dict | None) -> dict:
    """Validate ``teacher:`` and ``loss:`` of a ``finetune:`` mapping (ValueError: pydantic turns
    it into the recipe's one-line error); resolve the teacher's paths against the recipe."""
    from lighten.distill.models import parse_ref

    teacher = data.get("teacher")
    if teacher is not None:
        try:
            ref = parse_ref(teacher, role="teacher", context=context)
        except (LightenError, ValueError) as err:
            raise ValueError(f"teacher: {str(err).splitlines()[0]}") from None
        if not isinstance(ref, str):
            data["teacher"] = ref.model_dump(exclude_defaults=True)
    loss = data.get("loss")
    if loss is not None:
        names = [loss] if isinstance(loss, str) else list(loss)
        for name in names:
            if name not in LOSSES:
                try:
                    get_loss(name)
                except LightenError as err:
                    raise ValueError(str(err)) from None
        if isinstance(loss, dict) and data.get("distill"):
            raise ValueError("loss: {name: weight} gives the weights; remove distill")
    return data


def finetune_losses(config) -> dict[str, float]:
    """The ``{loss: weight}`` a ``finetune:`` block adds to the task loss."""
    if isinstance(config.loss, dict):
        return {("kd" if n in _LABEL_LOSSES else n): float(w) for n, w in config.loss.items()}
    weight = config.distill or DEFAULT_WEIGHT
    name = config.loss or "hinton"
    return {("kd" if name in _LABEL_LOSSES else name): weight}


def recovery_objective(ctx, model, config, dataset: Any):
    """The :class:`~lighten.distill.objective.Objective` a distilling fine-tune trains."""
    from lighten.distill.models import resolve_teacher
    from lighten.distill.objective import Objective

    teacher = resolve_teacher(config.teacher or "baseline", ctx)
    augment = bool(getattr(ctx.train_config, "augment", False))
    return Objective([model], task=ctx.task, train_set=dataset,
                     example=ctx.example_inputs(2), losses={"ce": 1.0, **finetune_losses(config)},
                     params=LossParams(temperature=config.temperature),
                     teachers=[teacher.model], cache=config.epochs >= 1 and not augment)
