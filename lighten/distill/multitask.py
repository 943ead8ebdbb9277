"""Multi-task distillation with a shared trunk: task teachers -> one student, one head each.

The student (the stage's input model by default) keeps everything up to its final Linear as the
shared trunk; that Linear becomes a :class:`~lighten.distill.heads.MultiHead` with one Linear
per task (the run's own task keeps the old weights when its classes match). Training mixes the
tasks' training sets, each repeated up to the largest so every head sees as many samples; a
sample's loss is Hinton KD from its own task's teacher on its own head.

The saved stage answers the run's own task (``MultiHead.select``: what the runner measures and
exports); ``select = None`` gives every head's logits as a tuple. Every task is measured on its
own test split (per-task rows and ``summary["tasks"]``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lighten.distill.heads import MultiHead
from lighten.distill.losses import get_loss
from lighten.distill.models import resolve_student, resolve_teacher
from lighten.distill.objective import Batch, DistillModule, Teachers, _predict_teachers
from lighten.errors import DataError, ModelError
from lighten.modules import get_submodule, set_submodule


class MultiTaskDataset(Dataset):
    """Items ``(x, [y, task, index within the task])``; smaller sets repeat to the largest."""

    def __init__(self, sets: list[Dataset], *, balance: bool = True):
        self.sets = sets
        size = max(len(s) for s in sets)
        self.index = [(k, i % len(s)) for k, s in enumerate(sets)
                      for i in range(size if balance else len(s))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int):
        k, i = self.index[j]
        x, y = self.sets[k][i]
        return x, torch.tensor([int(y), k, i])


class _MultiTaskLoss:
    """The task :func:`lighten.training.train` sees: per task, its losses on its samples' head."""

    def __init__(self, base, losses, params, teachers: list[Teachers], cached, weights):
        self.base, self.losses, self.params = base, losses, params
        self.teachers, self.cached, self.weights = teachers, cached, weights

    def as_inputs(self, x):
        return self.base.as_inputs(x)

    def loss(self, outputs: dict, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
        heads = outputs["students"][0]  # tuple: one (B, C_k) per task
        labels, task, index = targets[:, 0], targets[:, 1], targets[:, 2]
        total = heads[0].new_zeros(())
        for k, logits in enumerate(heads):
            mask = task == k
            if not mask.any():
                continue
            if self.cached is not None:
                teacher = self.cached[k].to(logits.device)[index[mask]]
            else:
                teacher = self.teachers[k]((outputs["inputs"][mask],))
            b = Batch(student=logits[mask], labels=labels[mask], teacher=teacher,
                      task_loss=lambda o, y: self.base.loss(o, y, label_smoothing=label_smoothing))
            for name, w in self.losses.items():
                total = total + self.weights[k] * w * get_loss(name).fn(b, self.params)
        return total


class _Module(DistillModule):
    def forward(self, *inputs: Tensor) -> dict:
        return {"students": [self.students[0](*inputs)], "inputs": inputs[0]}


def final_linear(model: nn.Module, example) -> str:
    """The name of the last Linear the forward calls (the head a task replaces)."""
    from lighten.distill.features import classifier_input

    return classifier_input(model, example)


def distill_multitask(model: nn.Module, config, ctx) -> nn.Module:
    from lighten.data import DataSpec, load_data

    datas, names = [], []
    for i, t in enumerate(config.tasks):
        data = load_data(DataSpec(**t.data))
        if tuple(data.input_shape) != tuple(ctx.input_shape):
            raise DataError(f"tasks[{i}] data {data.name} has inputs {list(data.input_shape)}, "
                            f"the student {list(ctx.input_shape)}; a shared trunk needs one "
                            "input shape")
        datas.append(data)
        names.append(t.name or data.name)
    own = next((i for i, d in enumerate(datas) if d.name == ctx.data.name), 0)
    teachers = [resolve_teacher(t.teacher, ctx, data=d) for t, d in zip(config.tasks, datas,
                                                                          strict=True)]
    student = resolve_student(config.student, ctx, model, None, seed=ctx.seed)
    trunk = student.model
    example = ctx.example_inputs(2)
    path = final_linear(trunk, example)
    old = get_submodule(trunk, path)
    head = MultiHead(old.in_features, [d.num_classes for d in datas], None, names)
    if old.out_features == datas[own].num_classes:
        head.heads[own].load_state_dict(old.state_dict())
    set_submodule(trunk, path, head)
    for k, (t, d) in enumerate(zip(teachers, datas, strict=True)):
        with torch.no_grad():
            out = t.model(*d.task.example_inputs(2))
        if out.shape[-1] != d.num_classes:
            raise ModelError(f"tasks[{k}] teacher ({t.label}) outputs {out.shape[-1]} classes, "
                             f"its data {d.name} has {d.num_classes}")
    augment = bool(getattr(ctx.train_config, "augment", False))
    fns = [Teachers([t.model]) for t in teachers]
    cached = None
    if config.cache_teacher and config.finetune.epochs >= 1 and not augment:
        cached = [_predict_teachers(f, d.train, d.task) for f, d in zip(fns, datas, strict=True)]
    module = _Module([trunk], nn.ModuleDict())
    loss = _MultiTaskLoss(ctx.task, config.loss_weights(), config.loss_params(), fns, cached,
                          [t.weight for t in config.tasks])
    dataset = MultiTaskDataset([d.train for d in datas])
    ctx.note(f"distill multitask: shared trunk of {student.label}, heads "
             + ", ".join(f"{n} ({d.num_classes} classes, teacher {t.label})"
                         for n, d, t in zip(names, datas, teachers, strict=True))
             + f"; {len(dataset)} training samples per epoch (tasks balanced)")
    ctx.finetune(module, config.finetune, dataset=dataset, task=loss)
    _measure_tasks(trunk, head, datas, names, teachers, ctx)
    head.select = own
    if student.source_spec is not None:
        ctx.source_spec = student.source_spec
        ctx.summary["source_spec"] = student.source_spec
    ctx.summary.update(method="multitask", own_task=names[own], head=path)
    return trunk.eval()


def _measure_tasks(model, head: MultiHead, datas, names, teachers, ctx) -> None:
    from lighten.training import evaluate

    rows = []
    for k, (d, n, t) in enumerate(zip(datas, names, teachers, strict=True)):
        head.select = k
        acc = evaluate(model, d.test, task=d.task)
        t_acc = evaluate(t.model, d.test, task=d.task)
        rows.append({"task": n, "accuracy": acc, "teacher_accuracy": t_acc})
        ctx.layer(f"head {n}", "train", before=f"teacher {t_acc:.4f}", after=f"{acc:.4f}",
                  accuracy=acc, teacher_accuracy=t_acc, reason=f"{d.name} test split")
    ctx.summary["tasks"] = rows
    ctx.note("multitask per-task test accuracy: " + ", ".join(
        f"{r['task']} {r['accuracy']:.4f} (teacher {r['teacher_accuracy']:.4f})" for r in rows))
