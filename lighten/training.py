"""The one training loop every step shares: seeded, hookable, with tqdm progress.

Steps never write their own loops; they pass ``loss_terms`` (extra penalties added to the
task's loss, cross-entropy for classification) and ``callbacks`` (e.g. re-apply a pruning mask
after each optimizer step). The loss and the inputs come from a :class:`lighten.task.Task`
(default: classification); multi-input models get ``model(*inputs)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from lighten.errors import DataError, LightenError
from lighten.memory import fit_inference_batch, fit_training_batch
from lighten.step import StrictModel
from lighten.task import Task

__all__ = ["Callback", "KeepMasks", "KeepZeros", "LossTerm", "TrainConfig", "evaluate",
           "predict", "pruned_mask", "pruned_masks", "train"]

# (model, x, outputs, y) -> loss; x is a tuple of tensors for multi-input tasks
LossTerm = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


class TrainConfig(StrictModel):
    """The ``train:`` block of a recipe (also the base for every step's fine-tuning)."""

    epochs: float = Field(3, ge=0, description="fractions run that share of one epoch's batches")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = Field(False, description="random crop (padded) + horizontal flip on images")


class Callback:
    """Hooks into :func:`train`; override only what you need (all default to no-ops)."""

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       total_steps: int) -> None: ...

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after ``optimizer.step()``; ``step`` counts finished steps, 1..total_steps."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """``epoch`` is the 0-based index of the epoch that just finished."""

    def on_train_end(self, model: nn.Module) -> None: ...


class KeepMasks(Callback):
    """Re-applies fixed keep-masks after every optimizer step so pruned weights stay exactly 0.

    ``weights`` and ``masks`` map the same names to a parameter and its boolean keep-mask.
    Re-applying after the step (rather than masking gradients) is exact for every optimizer:
    momentum, Adam moments and weight decay cannot move a weight that is zeroed again.
    """

    def __init__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]):
        self.weights, self.masks = weights, masks

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        with torch.no_grad():
            for name, w in self.weights.items():
                w.mul_(self.masks[name])


def pruned_mask(weight: Tensor) -> Tensor | None:
    """Keep-mask (``weight != 0``) of a pruned weight, None for a dense or all-zero one: the
    rule of :func:`pruned_masks` for one tensor (quantizers ask it too)."""
    keep = weight.detach() != 0
    return None if keep.all() or not keep.any() else keep


def pruned_masks(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, Tensor]]:
    """Which zeros of ``model`` count as pruned, as ``(parameters, keep-masks)``.

    The rule: a Conv/Linear-like weight (a module's ``weight`` parameter with 2 or more dims,
    the set every pruning step prunes) holding some, but not all, entries exactly 0 is a pruned
    layer, and those entries are its pruned positions (a trained weight is never exactly 0 by
    chance). An all-zero weight is a zero-initialized layer (a residual branch, a LoRA ``B``),
    not a pruned one, and may train. A BatchNorm channel whose scale and shift are both exactly
    0 (``prune.l1 target: bn``) keeps both at 0.
    """
    weights: dict[str, nn.Parameter] = {}
    masks: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.requires_grad:
            continue
        if w.dim() >= 2:
            keep = pruned_mask(w)
            if keep is not None:
                weights[f"{name}.weight"], masks[f"{name}.weight"] = w, keep
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.bias is not None:
            dead = (w.detach() == 0) & (module.bias.detach() == 0)
            if dead.any():
                for key, p in (("weight", w), ("bias", module.bias)):
                    weights[f"{name}.{key}"], masks[f"{name}.{key}"] = p, ~dead
    return weights, masks


class KeepZeros(KeepMasks):
    """Keeps the weights that are pruned when training starts (:func:`pruned_masks`) at 0.

    ``ctx.finetune`` adds it to every fine-tune, so no step's training regrows what an earlier
    pruning step removed.
    """

    def __init__(self):
        super().__init__({}, {})

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       total_steps: int) -> None:
        self.weights, self.masks = pruned_masks(model)


class TrainingDiverged(LightenError):
    """The loss became NaN or infinite."""


def train(model: nn.Module, dataset: Dataset, cfg: TrainConfig, *,
          loss_terms: Sequence[LossTerm] = (), callbacks: Sequence[Callback] = (),
          progress: bool = True, task: Task | None = None,
          checkpoint: str | os.PathLike | None = None) -> list[float]:
    """Train ``model`` in place on ``task.loss`` (default: cross-entropy on class logits);
    return the mean loss of each (possibly partial) epoch.

    With ``checkpoint`` (a ``.safetensors`` path) the whole training state is written there at
    each epoch end (:mod:`lighten.train_state`), and a matching file found there at the start
    continues after its last finished epoch: the result equals an uninterrupted training.
    The caller deletes the file once the trained model is saved elsewhere."""
    from tqdm.auto import tqdm

    from lighten import train_state
    from lighten.data import make_loader
    from lighten.progress import line, on_terminal

    if len(dataset) == 0:
        raise DataError("training set is empty; check the data block (limit_train?)")
    torch.manual_seed(cfg.seed)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed)
    total_steps = math.ceil(cfg.epochs * len(loader))
    if total_steps == 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LightenError(f"{type(model).__name__} has no trainable parameters; "
                           "nothing to train (set finetune epochs to 0)")
    optimizer = _make_optimizer(params, cfg, no_decay={  # e.g. LSQ's learned log-scales
        id(p) for m in model.modules() if callable(getattr(m, "no_weight_decay", None))
        for p in m.no_weight_decay() if isinstance(p, nn.Parameter)})
    scheduler = _make_scheduler(optimizer, cfg, total_steps)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    device = next(model.parameters(), torch.empty(0)).device

    was_training = model.training
    model.train()
    losses: list[float] = []
    step, first_epoch, epochs = 0, 0, math.ceil(cfg.epochs)
    generators = {"loader": loader.generator, "augment": aug_gen}
    key = train_state.state_key(model, cfg.model_dump(), len(dataset)) if checkpoint else ""
    if checkpoint:  # continue after the last finished epoch of an interrupted training
        meta = train_state.load_train_state(checkpoint, model=model, optimizer=optimizer,
                                            scheduler=scheduler, generators=generators, key=key)
        if meta is not None:
            step, first_epoch, losses = meta["step"], meta["epoch"] + 1, list(meta["losses"])
    micro = fit_training_batch(model, lambda b: _example_inputs(task, dataset, b),
                               cfg.batch_size, optimizer=cfg.optimizer)
    if micro < cfg.batch_size:
        line(f"memory budget: each batch of {cfg.batch_size} runs as micro-batches of {micro} "
             "(gradients accumulated; BatchNorm sees the micro-batches)", enabled=progress)
    for cb in callbacks:
        cb.on_train_begin(model, optimizer, total_steps)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", leave=False,
               disable=not (progress and on_terminal()))  # a file or pipe gets epoch lines
    try:
        for epoch in range(first_epoch, epochs):
            running, batches = 0.0, 0
            for x, y in loader:
                inputs = tuple(t.to(device) for t in _as_inputs(task, x))
                y = y.to(device)
                if cfg.augment:
                    inputs = (augment_batch(inputs[0], generator=aug_gen), *inputs[1:])
                optimizer.zero_grad(set_to_none=True)
                loss = 0.0
                for share, part, part_y in _micro_batches(inputs, y, micro):
                    part_loss = _loss(model, task, cfg, part, part_y, loss_terms) * share
                    if not torch.isfinite(part_loss):
                        raise TrainingDiverged(f"training loss became {part_loss.item()} at step "
                                               f"{step + 1}; lower the learning rate (lr={cfg.lr})")
                    part_loss.backward()  # gradients add up over the micro-batches
                    loss += part_loss.item()
                optimizer.step()
                scheduler.step()
                step += 1
                running += loss
                batches += 1
                for cb in callbacks:
                    cb.on_step_end(model, step, total_steps)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / batches:.4f}")
                if step >= total_steps:
                    break
            losses.append(running / max(batches, 1))
            for cb in callbacks:
                cb.on_epoch_end(model, epoch)
            line(f"train epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", enabled=progress)
            if step >= total_steps:
                break
            if checkpoint:
                train_state.save_train_state(checkpoint, model=model, optimizer=optimizer,
                                             scheduler=scheduler, epoch=epoch, step=step,
                                             losses=losses, generators=generators, key=key)
    finally:
        bar.close()
        model.train(was_training)
    for cb in callbacks:
        cb.on_train_end(model)
    return losses


def _loss(model, task, cfg: TrainConfig, inputs, y, loss_terms) -> Tensor:
    outputs = model(*inputs)
    if task is None:
        loss = F.cross_entropy(outputs, y, label_smoothing=cfg.label_smoothing)
    else:
        loss = task.loss(outputs, y, label_smoothing=cfg.label_smoothing)
    x = inputs[0] if len(inputs) == 1 else inputs
    for term in loss_terms:
        loss = loss + term(model, x, outputs, y)
    return loss


def _micro_batches(inputs: tuple[Tensor, ...], y: Tensor, micro: int):
    """(share of the batch, inputs, labels) per micro-batch of at most ``micro`` samples: the
    whole batch when it fits the memory budget (:mod:`lighten.memory`)."""
    n = len(y)
    if micro >= n:
        yield 1.0, inputs, y
        return
    for start in range(0, n, micro):
        stop = min(n, start + micro)
        yield (stop - start) / n, tuple(t[start:stop] for t in inputs), y[start:stop]


def _example_inputs(task: Task | None, dataset: Dataset, batch: int) -> tuple[Tensor, ...]:
    """Inputs of ``batch`` samples for the memory estimate: the task's, else the data's."""
    if task is not None:
        return task.example_inputs(batch)
    x = dataset[0][0]
    return tuple(torch.zeros(batch, *t.shape, dtype=t.dtype)
                 for t in (x if isinstance(x, tuple | list) else (x,)))


def predict(model: nn.Module, dataset: Dataset, *, batch_size: int = 512,
            progress: bool = False, task: Task | None = None) -> Tensor:
    """Outputs for the whole dataset, in order, in eval mode: logits ``(N, C)`` for
    classification, ``(N, T, V)`` for a language model."""
    logits, _ = _run(model, dataset, batch_size=batch_size, progress=progress, task=task)
    return logits


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 512,
             progress: bool = False, task: Task | None = None) -> float:
    """Top-1 accuracy in eval mode under ``torch.inference_mode`` (``task.score``: next-token
    accuracy for a language model); without a task, top-1 over the last axis."""
    logits, labels = _run(model, dataset, batch_size=batch_size, progress=progress, task=task)
    if len(labels) == 0:
        raise DataError("evaluation set is empty; check the data block (limit_test?)")
    if task is not None:
        return float(task.score(logits, labels))
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def augment_batch(x: Tensor, *, generator: torch.Generator, pad: int | None = None) -> Tensor:
    """Random crop after padding with the background value, plus a random horizontal flip."""
    if x.dim() != 4:
        raise DataError(f"augment needs image batches (B, C, H, W), got shape {tuple(x.shape)}; "
                        "set train.augment: false")
    b, _, h, w = x.shape  # (B, C, H, W)
    pad = pad if pad is not None else max(1, min(h, w) // 12)  # 28x28 -> 2, 8x8 -> 1
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out).contiguous()


def _as_inputs(task: Task | None, x) -> tuple[Tensor, ...]:
    if task is not None:
        return task.as_inputs(x)
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _run(model: nn.Module, dataset: Dataset, *, batch_size: int, progress: bool,
         task: Task | None = None):
    from tqdm.auto import tqdm

    from lighten.data import make_loader
    from lighten.progress import on_terminal

    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with torch.inference_mode():
            batch_size = fit_inference_batch(model, lambda b: _example_inputs(task, dataset, b),
                                             batch_size)
            loader = make_loader(dataset, batch_size, shuffle=False)
            shown = progress and on_terminal()  # bars only on a terminal, never in a log
            for x, y in tqdm(loader, desc="eval", disable=not shown, leave=False):
                logits.append(model(*(t.to(device) for t in _as_inputs(task, x))).float().cpu())
                labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def _make_optimizer(params, cfg: TrainConfig, no_decay: set[int] = frozenset()
                    ) -> torch.optim.Optimizer:
    if no_decay and cfg.weight_decay:
        rest = [p for p in params if id(p) not in no_decay]
        params = [*([{"params": rest}] if rest else []),
                  {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps)
                                                      / total_steps))
    )
