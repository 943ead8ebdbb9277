"""What every step receives: its typed config (a pydantic model) and a :class:`StepContext`.

A step never trains on its own terms: it asks ``ctx.finetune`` so every step shares the same
loop, seed handling, progress bars and distillation from the baseline (``distill:``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

if TYPE_CHECKING:
    from lighten.data import DataBundle
    from lighten.train import Callback, LossTerm, TrainConfig


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneConfig(StrictModel):
    """The optional ``finetune:`` block every step accepts. Unset fields use the recipe's train."""

    epochs: float = Field(1, ge=0, description="epochs of fine-tuning; fractions allowed")
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    distill: float = Field(0.0, ge=0, description="weight of a soft-target loss from the "
                           "recipe's baseline model (the teacher); 0 = labels only")
    temperature: float = Field(4.0, gt=0, description="softmax temperature for distill")

    @model_validator(mode="after")
    def _temperature_needs_distill(self):
        if "temperature" in self.model_fields_set and not self.distill:
            raise ValueError("finetune temperature only applies with distill > 0; set distill "
                             "(e.g. 0.5) or remove temperature")
        return self


class StepConfig(StrictModel):
    finetune: FinetuneConfig | None = None


@dataclass
class StepContext:
    data: DataBundle
    train_config: TrainConfig
    baseline: nn.Module
    workdir: Path
    seed: int = 0
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape)

    def note(self, message: str) -> None:
        """Record something the report should show (e.g. a layer left in float)."""
        self.notes.append(message)

    def finetune(
        self,
        model: nn.Module,
        config: FinetuneConfig | None,
        *,
        loss_terms: Sequence[LossTerm] = (),
        callbacks: Sequence[Callback] = (),
    ) -> nn.Module:
        """Fine-tune ``model`` in place with the shared loop; a no-op when ``config`` is None."""
        if config is None or config.epochs == 0:
            return model
        from lighten.train import train

        base = self.train_config
        cfg = base.model_copy(
            update={
                "epochs": config.epochs,
                "lr": config.lr if config.lr is not None else base.lr * 0.1,
                "batch_size": config.batch_size or base.batch_size,
                "seed": self.seed,
            }
        )
        if config.distill:
            from lighten.distill import teacher_term

            teacher = copy.deepcopy(self.baseline)
            loss_terms = [*loss_terms, teacher_term(teacher, weight=config.distill,
                                                    temperature=config.temperature)]
        train(model, self.data.train, cfg, loss_terms=loss_terms, callbacks=callbacks,
              progress=self.progress)
        return model

    def calibration_batches(self, samples: int, batch_size: int = 64) -> Iterator[torch.Tensor]:
        """Inputs only, from the training split, deterministic for a given seed."""
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.data.train)
        idx = torch.randperm(n, generator=g)[: min(samples, n)]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            yield torch.stack([self.data.train[int(i)][0] for i in chunk])

    def labelled_batches(self, samples: int, batch_size: int = 64,
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) from the training split, deterministic for a given seed (for
        gradient-based importance such as Taylor)."""
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(self.data.train), generator=g)[:samples]
        for start in range(0, len(idx), batch_size):
            items = [self.data.train[int(i)] for i in idx[start : start + batch_size]]
            yield (torch.stack([x for x, _ in items]),
                   torch.stack([torch.as_tensor(y) for _, y in items]))
