"""What every step receives: its typed config (a pydantic model) and a :class:`StepContext`.

A step never trains on its own terms: it asks ``ctx.finetune`` so every step shares the same
loop, seed handling, progress bars and distillation from the baseline (``distill:``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from torch import nn

from lighten.target import Target

if TYPE_CHECKING:
    from lighten.data import DataBundle
    from lighten.training import Callback, LossTerm, TrainConfig


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneConfig(StrictModel):
    """The optional ``finetune:`` block every step accepts. Unset fields use the recipe's train
    (optimizer, schedule: cosine by default, weight decay, ...).

    The learning rate is ``lr`` when given, else ``lr_scale`` x the recipe's ``train.lr``. The
    default scale is per step: 0.1 here (a touch-up of a trained model: the quantization steps),
    3.0 in :class:`PruneFinetuneConfig` (every ``prune.*`` step: recovering from removed weights
    is re-training). Measured on Fashion-MNIST (``tests/test_finetune_defaults.py``, README).
    """

    epochs: float = Field(1, ge=0, description="epochs of fine-tuning; fractions allowed")
    lr: float | None = Field(None, gt=0, description="learning rate; unset: lr_scale x train lr")
    lr_scale: float = Field(0.1, gt=0, description="without lr: the fine-tune lr is this "
                            "multiple of the recipe's train lr (quantization steps 0.1, "
                            "pruning steps 3.0)")
    batch_size: int | None = Field(None, ge=1)
    distill: float = Field(0.0, ge=0, description="weight of a soft-target loss from the "
                           "recipe's baseline model (the teacher); 0 = labels only")
    temperature: float = Field(4.0, gt=0, description="softmax temperature for distill")
    teacher: str | dict[str, Any] | None = Field(
        None, description="distill from this teacher instead of the baseline: 'baseline', an "
        "artifact path, {zoo: ...}, {python: t.py:build, weights: ...} or {stage: NAME} "
        "(lighten.distill.models); distill defaults to 0.5 with it")
    loss: str | dict[str, float] | None = Field(
        None, description="distillation loss added with weight distill: hinton (default: "
        "soft targets), dkd, hint, attention, relational; or {name: weight, ...}")

    @model_validator(mode="before")
    @classmethod
    def _distill_refs(cls, data, info: ValidationInfo):
        """Check ``teacher:`` / ``loss:`` now (one recipe line), paths relative to the recipe."""
        if isinstance(data, dict) and (data.get("teacher") is not None
                                       or data.get("loss") is not None):
            from lighten.distill.recovery import check_finetune_fields

            data = check_finetune_fields(dict(data), info.context)
        return data

    @model_validator(mode="after")
    def _temperature_needs_distill(self):
        if "temperature" in self.model_fields_set and not self.distills:
            raise ValueError("finetune temperature only applies with distill > 0; set distill "
                             "(e.g. 0.5) or remove temperature")
        return self

    @property
    def distills(self) -> bool:
        """Whether fine-tuning learns from a teacher (``distill``, ``teacher`` or ``loss``)."""
        return bool(self.distill) or self.teacher is not None or self.loss is not None


class PruneFinetuneConfig(FinetuneConfig):
    """``finetune:`` of the pruning steps: the same keys, a larger default learning rate.

    On LeNet-300-100 at 95% AGP sparsity (8 epochs) 0.1 x train lr lost 4.36 points, 1x 1.40,
    3x 0.92 (0.33 with AGP ending at half the fine-tune); ``prune.channels`` on LeNet-5 (half the
    MACs, 1 epoch) lost 3.82 / 1.44 / 0.90; magnitude 50% one-shot (1 epoch) +0.13 at 3x.
    """

    lr_scale: float = Field(3.0, gt=0, description="without lr: the fine-tune lr is this "
                            "multiple of the recipe's train lr (pruning steps: 3.0)")


class StepConfig(StrictModel):
    finetune: FinetuneConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        """``skip:`` was the quant steps' name for what every step now calls ``ignore:``."""
        if isinstance(data, dict) and "skip" in data and "ignore" in cls.model_fields:
            raise ValueError("unknown key 'skip'; did you mean 'ignore'? (every step names the "
                             "modules it leaves alone 'ignore')")
        return data

    @model_validator(mode="before")
    @classmethod
    def _finetune_defaults(cls, data):
        """A ``FinetuneConfig`` object given to a step takes that step's defaults for what it
        leaves unset (a pruning step's ``lr_scale``), as a ``finetune:`` mapping does."""
        ft = data.get("finetune") if isinstance(data, dict) else None
        if isinstance(ft, FinetuneConfig):
            data = {**data, "finetune": ft.model_dump(include=ft.model_fields_set)}
        return data


class PruneStepConfig(StepConfig):
    """Base of the ``prune.*`` step configs: their ``finetune:`` defaults to 3x the train lr."""

    finetune: PruneFinetuneConfig | None = None


@dataclass
class StepContext:
    data: DataBundle
    train_config: TrainConfig
    baseline: nn.Module | None  # the teacher of distillation (None: the step needs none)
    workdir: Path
    seed: int = 0
    progress: bool = True
    notes: list[str] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)  # per-layer rows: ctx.layer(...)
    summary: dict = field(default_factory=dict)  # step-level facts for the Report
    # where the model will run (recipe deploy:); steps read CPU facts from it, not this machine
    target: Target = field(default_factory=Target.this_machine)
    # set by a step whose output is another architecture (a distilled student, a searched
    # model): how to build that model's source, e.g. {"zoo": "resnet20", "kwargs": {...}};
    # None keeps the recipe's model. Artifacts from then on start their edit log from it.
    source_spec: dict | None = None
    # how the recipe's baseline is built (the runner's model: block); a distilled student
    # derived from the baseline starts its artifact from it
    baseline_spec: dict | None = None
    # how the model given to the step is built (the recipe's model:, or a previous step's
    # source_spec); a step that wraps the model records it (dynamic.early_exit's backbone)
    model_spec: dict | None = None
    # what a gradient pass over the step's input model needs (lighten.memory.Footprint; set by
    # lighten.verb.run_step under a memory budget): calibration batches are sized from it
    memory_footprint: object | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    @property
    def task(self):
        """What the model is for (``lighten.task.Task``): inputs, loss, metrics."""
        return self.data.task

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Positional arguments of ``model(*inputs)`` (zeros of the task's input shapes/dtypes)."""
        return self.task.example_inputs(batch)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """The one input of a single-input task (int64 token ids for a language model)."""
        inputs = self.example_inputs(batch)
        if len(inputs) != 1:
            from lighten.errors import UnsupportedError

            raise UnsupportedError(f"this step needs a model with one input; the task "
                                   f"({type(self.task).__name__}) has {len(inputs)}")
        return inputs[0]

    def note(self, message: str) -> None:
        """Record something the report should show (e.g. a layer left in float)."""
        self.notes.append(message)

    def layer(self, module: str, action: str, **row) -> None:
        """One per-layer row of the step's :class:`~lighten.verb.Report`, e.g.
        ``ctx.layer("conv1", "resize", before="16 out", after="8 out", out_after=8)``."""
        self.layers.append({"module": module, "action": action, **row})

    @property
    def report(self):
        """What the step recorded so far, as a live :class:`~lighten.verb.Report`."""
        from lighten.verb import Report

        return Report(step="", config={}, notes=self.notes, layers=self.layers,
                      summary=self.summary)

    def finetune(
        self,
        model: nn.Module,
        config: FinetuneConfig | None,
        *,
        loss_terms: Sequence[LossTerm] = (),
        callbacks: Sequence[Callback] = (),
        keep_zeros: bool = True,
        dataset=None,
        task=None,
    ) -> nn.Module:
        """Fine-tune ``model`` in place with the shared loop; a no-op when ``config`` is None.

        Pruned weights stay exactly zero (``keep_zeros``: :class:`lighten.training.KeepZeros`, the
        rule is :func:`lighten.training.pruned_masks`); with ``keep_zeros=False`` they may regrow,
        and a note and a warning say so before training starts."""
        if config is None or config.epochs == 0:
            return model
        from lighten.training import KeepZeros, pruned_masks, train

        base = self.train_config
        cfg = base.model_copy(
            update={
                "epochs": config.epochs,
                "lr": config.lr if config.lr is not None else base.lr * config.lr_scale,
                "batch_size": config.batch_size or base.batch_size,
                "seed": self.seed,
            }
        )
        dataset = dataset if dataset is not None else self.data.train
        objective = None
        if config.distills:  # the teacher's loss terms; lighten.distill.recovery
            from lighten.distill.recovery import recovery_objective

            objective = recovery_objective(self, model, config, dataset)
            model, dataset, task = objective.module, objective.dataset, objective.task
        if keep_zeros:
            callbacks = [KeepZeros(), *callbacks]
        elif regrow := pruned_masks(model)[0]:
            import warnings

            message = (f"fine-tuning does not keep pruned zeros: {len(regrow)} pruned weight "
                       "tensors may regrow (keep_zeros=False)")
            self.note(message)
            warnings.warn(message, stacklevel=2)
        try:
            train(model, dataset, cfg, loss_terms=loss_terms, callbacks=callbacks,
                  progress=self.progress, task=task if task is not None else self.task)
        finally:
            if objective is not None:
                objective.close()
                model = objective.module.students[0]
        return model

    def calibration_batches(self, samples: int, batch_size: int = 64) -> Iterator[torch.Tensor]:
        """Inputs only, from the training split, deterministic for a given seed: a tensor per
        batch for single-input tasks, a ``lighten.task.Inputs`` tuple (``model(*batch)``)
        otherwise."""
        from lighten.task import Inputs

        for inputs, _ in self._batches(samples, batch_size):
            yield inputs[0] if len(inputs) == 1 else Inputs(inputs)

    def labelled_batches(self, samples: int, batch_size: int = 64,
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) from the training split, deterministic for a given seed (for
        gradient-based importance such as Taylor)."""
        for inputs, targets in self._batches(samples, batch_size):
            yield (inputs[0] if len(inputs) == 1 else inputs), targets

    def _batches(self, samples: int, batch_size: int):
        """(inputs tuple, targets) batches of a fixed random subset of the training split."""
        from torch.utils.data import default_collate

        if self.memory_footprint is not None:  # gradients may be taken (Taylor): size for them
            from lighten.memory import current_budget

            if (budget := current_budget()) is not None:
                batch_size = budget.fit(self.memory_footprint, batch_size, "calibration")
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.data.train)
        idx = torch.randperm(n, generator=g)[: min(samples, n)]
        for start in range(0, len(idx), batch_size):
            x, y = default_collate([self.data.train[int(i)] for i in idx[start:start + batch_size]])
            yield self.task.as_inputs(x), torch.as_tensor(y)
