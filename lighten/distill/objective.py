"""One distillation objective: students, frozen teachers, trainable extras, one loss.

The shared training loop (``lighten.training.train``) trains a module on a task's loss. Here the
module is :class:`DistillModule` (the student(s) plus adapters and exit heads, so one optimizer
trains them all; the teachers are held outside its parameters) and the task is
:class:`ObjectiveTask`, whose loss is the weighted sum of the registered losses. After training
:meth:`Objective.close` removes every hook; the students are the plain modules they were, and
adapters and heads are dropped (or kept on request), so they never reach a saved student.

Teacher outputs are cached once for the whole training set when the data is fixed (no
augmentation) and there is at least one epoch to train: each sample's logits (and the
embedding or feature maps the losses read, the maps in bfloat16 up to
:data:`FEATURE_CACHE_BYTES`) are then looked up by index instead of running the teacher every
step. Measured (``benchmarks/distill.py --quick``, ResNet-20 teacher -> LeNet-5 student, 3,000
Fashion-MNIST images, 3 epochs of hinton, shared 2-core CPU): 43.2 s with the teacher run every
step, 8.7 s with its logits cached, 5.0x faster (the teacher's forward dominates; the gain grows
with the epochs, one epoch costs the same either way).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lighten.distill.features import FeatureTap, classifier_input, make_adapter, match_layers
from lighten.distill.heads import ExitHeads, exit_head
from lighten.distill.losses import Batch, LossParams, get_loss
from lighten.errors import ModelError

# Teacher feature maps are cached (bfloat16) when they fit in this many bytes; above it the
# teacher runs every step. 55,000 Fashion-MNIST images x ResNet-20's three stage ends: 2.4 GB.
FEATURE_CACHE_BYTES = 4 << 30


class Teachers:
    """Frozen teacher(s) -> logits. Several teachers: the weighted average of their softened
    probabilities ``p = sum_i w_i softmax(z_i / T)``, returned as ``T * log p`` so every loss
    that softens by ``T`` sees exactly ``p``."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 temperature: float = 4.0):
        self.models = list(models)
        w = torch.tensor(list(weights) if weights is not None else [1.0] * len(self.models))
        self.weights = w / w.sum()
        self.temperature = temperature

    def __call__(self, inputs: tuple[Tensor, ...]) -> Tensor:
        with torch.no_grad():
            outs = [m(*inputs) for m in self.models]
            if len(outs) == 1:
                return outs[0]
            t = self.temperature
            p = sum(w * F.softmax(z / t, -1) for w, z in zip(self.weights, outs, strict=True))
            return t * p.clamp_min(1e-12).log()


class DistillModule(nn.Module):
    """What trains: the students and the extras (adapters, exit heads). Teachers are kept in a
    plain attribute, outside ``parameters()`` and out of ``train()``'s reach."""

    def __init__(self, students: Sequence[nn.Module], extras: nn.ModuleDict):
        super().__init__()
        self.students = nn.ModuleList(students)
        self.extras = extras
        self.teacher_fn: Teachers | None = None  # plain attribute: not a submodule
        self.live_teacher = False

    def forward(self, *inputs: Tensor) -> dict:
        out = {"students": [s(*inputs) for s in self.students], "teacher": None}
        if self.live_teacher and self.teacher_fn is not None:
            out["teacher"] = self.teacher_fn(inputs)
        return out


class IndexedDataset(Dataset):
    """Items ``(x, [y, index])``: the index finds a sample's cached teacher logits."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, torch.tensor([int(y), i])


class ObjectiveTask:
    """What :func:`lighten.training.train` sees: the base task's inputs, the objective's loss."""

    def __init__(self, base, objective: Objective):
        self.base, self.objective = base, objective

    def as_inputs(self, x):
        return self.base.as_inputs(x)

    def loss(self, outputs, targets, *, label_smoothing: float = 0.0) -> Tensor:
        return self.objective.loss(outputs, targets, label_smoothing=label_smoothing)


@dataclass
class _Student:
    model: nn.Module
    tap: FeatureTap | None = None
    pairs: list[tuple[str, str, str | None]] = field(default_factory=list)  # s, t, adapter key
    embedding: str | None = None          # the student's final Linear (its input is read)
    exits: list[str] = field(default_factory=list)  # layers with an exit head
    heads: str | None = None              # extras key of its ExitHeads


class Objective:
    """Build with the students, the teacher(s) and ``losses`` ({name: weight}); train
    ``objective.module`` on ``objective.dataset`` with ``task=objective.task``; then
    :meth:`close`."""

    def __init__(self, students: Sequence[nn.Module], *, task, train_set: Dataset,
                 example: tuple[Tensor, ...], losses: Mapping[str, float],
                 params: LossParams | None = None, teachers: Sequence[nn.Module] = (),
                 teacher_weights: Sequence[float] | None = None, layers="auto",
                 exit_layers="auto", head_hidden: int = 0, num_classes: int | None = None,
                 cache: bool = True, warmup_steps: int = 0, augment=None):
        self.losses = {name: float(w) for name, w in losses.items() if w}
        specs = [get_loss(n) for n in self.losses]
        needs = set().union(*(s.needs for s in specs)) if specs else set()
        params = params or LossParams()
        self.params, self.base_task = params, task
        self.needs = needs
        if not needs & {"teacher", "features", "embeddings"}:
            teachers = ()  # e.g. a student derived from the teacher, trained on labels only
        elif not teachers:
            raise ModelError(f"losses {sorted(self.losses)} need a teacher; give teacher:")
        if ("features" in needs or "embeddings" in needs) and len(teachers) != 1:
            raise ModelError("feature losses (hint, attention, relational) read one teacher's "
                             "layers; an ensemble teaches through its outputs only")
        self.teachers = Teachers(teachers, teacher_weights, params.temperature) if teachers \
            else None
        self.teacher_tap: FeatureTap | None = None
        extras = nn.ModuleDict()
        self.students = [_Student(s) for s in students]
        t_names: list[str] = []
        t_inputs: list[str] = []
        t_shapes: dict[str, tuple[int, ...]] = {}
        for k, st in enumerate(self.students):
            names, inputs = [], []
            if "features" in needs:
                for i, (sp, tp) in enumerate(match_layers(st.model, teachers[0], example,
                                                          layers)):
                    key = None
                    if "adapters" in needs:
                        key = f"adapter{k}_{i}"
                        extras[key] = make_adapter(sp.shape, tp.shape)
                    st.pairs.append((sp.name, tp.name, key))
                    names.append(sp.name)
                    t_names.append(tp.name)
                    t_shapes[tp.name] = tp.shape
            if "embeddings" in needs:
                st.embedding = classifier_input(st.model, example)
                inputs.append(st.embedding)
                t_inputs.append(classifier_input(teachers[0], example))
            if "exits" in needs:
                st.exits, shapes = _exit_layers(st.model, example, exit_layers)
                st.heads = f"exits{k}"
                extras[st.heads] = ExitHeads(st.exits, [list(s) for s in shapes],
                                             num_classes or _classes(st.model, example),
                                             head_hidden)
                names += st.exits
            if names or inputs:
                st.tap = FeatureTap(st.model, names, inputs=inputs)
        if t_names or t_inputs:
            self.teacher_tap = FeatureTap(teachers[0], t_names, inputs=t_inputs[:1])
        self.module = DistillModule([s.model for s in self.students], extras)
        self.module.teacher_fn = self.teachers
        self.cached: Tensor | None = None
        self.cached_embeddings: Tensor | None = None  # augment views + relational
        self.cached_features: dict[str, Tensor] = {}  # teacher layer -> (N, C, H, W) bfloat16
        self.feature_cache_bytes = len(train_set) * sum(
            math.prod(shape) for shape in t_shapes.values()) * 2
        # fixed data, but the maps too big to keep: the teacher runs every step
        self.feature_cache_refused = bool(
            self.teachers is not None and cache and augment is None and t_shapes
            and self.feature_cache_bytes > FEATURE_CACHE_BYTES)
        self.teacher_fit: dict[str, float] | None = None  # with a cache: teacher on train set
        self.augment = augment  # AugmentConfig: student and teacher see the same views
        if augment is not None:
            from lighten.distill.augment import AugmentedViews, view_logits

            self.dataset = AugmentedViews(train_set, augment)
            # relational losses read the teacher's embedding only: cached per view as well
            embedding = f"{t_inputs[0]}:input" if t_inputs else None
            if self.teachers is not None and cache and augment.views and "features" not in needs:
                self.cached, self.cached_embeddings = view_logits(
                    self.teachers, self.dataset, task, tap=self.teacher_tap,
                    embedding=embedding if "embeddings" in needs else None)
                labels = self.dataset.labels.repeat(augment.views)
                self.teacher_fit = teacher_fit(self.cached, labels, params.temperature)
            else:
                self.module.live_teacher = self.teachers is not None
        elif (self.teachers is not None and cache and _scalar_labels(train_set)
              and self.feature_cache_bytes <= FEATURE_CACHE_BYTES):
            # fixed data: the teacher's logits (and embedding, feature maps) cached once
            self.cached, labels, self.cached_embeddings, self.cached_features = _cache_teachers(
                self.teachers, train_set, task, tap=self.teacher_tap,
                embedding=f"{t_inputs[0]}:input" if t_inputs else None,
                features={n: t_shapes[n] for n in dict.fromkeys(t_names)})
            self.teacher_fit = teacher_fit(self.cached, labels, params.temperature)
            self.dataset: Dataset = IndexedDataset(train_set)
        else:
            self.dataset = train_set
            self.module.live_teacher = self.teachers is not None
        self.task = ObjectiveTask(task, self)
        self.warmup_steps, self.steps = warmup_steps, 0

    # ------------------------------------------------------------------------------ the loss
    def loss(self, outputs: dict, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
        if self.augment is not None:  # views: [y_a, y_b, lam, cached row]
            from lighten.distill.augment import mixed_cross_entropy, split_targets

            labels, other, lam, row = split_targets(targets)
            teacher = self.cached.to(targets.device)[row] if self.cached is not None else \
                outputs["teacher"]
        elif self.cached is not None:
            labels, row = targets[:, 0], targets[:, 1]
            teacher = self.cached.to(targets.device)[row]
        else:
            labels, teacher = targets, outputs["teacher"]

        def task_loss(o: Tensor, y: Tensor) -> Tensor:
            if self.augment is not None and self.augment.mixup and y is labels:
                return mixed_cross_entropy(o, labels, other, lam, label_smoothing=label_smoothing)
            return self.base_task.loss(o, y, label_smoothing=label_smoothing)

        logits = outputs["students"]
        ramp = 1.0
        if self.warmup_steps and self.module.training:
            self.steps += 1
            ramp = min(1.0, self.steps / self.warmup_steps)
        t_feats = self.teacher_tap.features if self.teacher_tap is not None else {}
        if self.cached_embeddings is not None or self.cached_features:
            t_feats = {name: v.to(targets.device)[row].float()
                       for name, v in self.cached_features.items()}
            if self.cached_embeddings is not None:
                t_feats["cached:input"] = self.cached_embeddings.to(targets.device)[row]
        total = logits[0].new_zeros(())
        for k, st in enumerate(self.students):
            feats = st.tap.features if st.tap is not None else {}
            b = Batch(student=logits[k], labels=labels, task_loss=task_loss, teacher=teacher,
                      ramp=ramp)
            for s_name, t_name, key in st.pairs:
                b.pairs.append((feats[s_name], t_feats[t_name]))
                if key is not None:
                    b.adapted.append((self.module.extras[key](feats[s_name]), t_feats[t_name]))
            if st.embedding is not None:
                t_key = next(k2 for k2 in t_feats if k2.endswith(":input"))
                b.embeddings = (feats[f"{st.embedding}:input"], t_feats[t_key])
            if st.heads is not None:
                b.exits = self.module.extras[st.heads]([feats[n] for n in st.exits])
            if "peers" in self.needs:
                b.peers = [o.detach() for j, o in enumerate(logits) if j != k]
            for name, weight in self.losses.items():
                total = total + weight * get_loss(name).fn(b, self.params)
        return total

    def close(self, *, keep_heads: bool = False) -> None:
        """Remove every hook; with ``keep_heads`` attach each student's trained exit heads as
        its ``exit_heads`` child (saved with it; the forward never calls them)."""
        for st in self.students:
            if st.tap is not None:
                st.tap.remove()
            if keep_heads and st.heads is not None:
                st.model.exit_heads = self.module.extras[st.heads]
        if self.teacher_tap is not None:
            self.teacher_tap.remove()


def _predict_teachers(teachers: Teachers, dataset: Dataset, task) -> Tensor:
    """The teachers' combined logits for every sample, in order (eval mode, no grad)."""
    return _cache_teachers(teachers, dataset, task)[0]


def _cache_teachers(teachers: Teachers, dataset: Dataset, task, *,
                    tap: FeatureTap | None = None, embedding: str | None = None,
                    features: Mapping[str, tuple[int, ...]] | None = None):
    """One pass of the teachers over ``dataset`` in order: ``(logits, labels, embeddings,
    features)``. With ``tap``: ``embedding`` (a tap key such as ``fc:input``) per sample, or
    None; ``features`` ({teacher layer: shape}) per sample in bfloat16 (half the bytes of
    float32, relative error below 0.4%, the range of float32), else empty."""
    from lighten.data import make_loader

    features = dict(features or {})
    n = len(dataset)
    kept = {name: torch.empty((n, *shape), dtype=torch.bfloat16)
            for name, shape in features.items()}
    out, labels, emb = [], [], []
    seen = 0
    with torch.inference_mode():
        for x, y in make_loader(dataset, 512, shuffle=False):
            out.append(teachers(tuple(task.as_inputs(x))).float())
            labels.append(torch.as_tensor(y))
            if embedding is not None:
                emb.append(tap.features[embedding].flatten(1).float().clone())
            for name, store in kept.items():
                store[seen:seen + len(x)] = tap.features[name]
            seen += len(x)
    return torch.cat(out), torch.cat(labels), torch.cat(emb) if emb else None, kept


def teacher_fit(logits: Tensor, labels: Tensor, temperature: float) -> dict[str, float] | None:
    """How much a teacher has to teach on the training set: its top-1 accuracy there and the
    mean probability it gives the true class at T = 1 and at the distillation temperature.

    A teacher barely more accurate on the training set than the student can get by itself, or
    one whose softened targets put little mass on the true class, makes soft targets a weaker
    signal than the labels (issue #12: ResNet-20 teacher 93.5% / 0.90 / 0.51 at T 4).
    None where the outputs are not class logits ``(N, C)`` against class ids ``(N,)`` (a
    regression, per-token logits)."""
    if (logits.dim() != 2 or labels.shape != logits.shape[:1]
            or labels.dtype not in (torch.int64, torch.int32)):
        return None
    p1 = F.softmax(logits, -1).gather(1, labels[:, None]).mean()
    pt = F.softmax(logits / temperature, -1).gather(1, labels[:, None]).mean()
    acc = (logits.argmax(-1) == labels).float().mean()
    return {"train_accuracy": float(acc), "true_class_prob": float(p1),
            "true_class_prob_at_t": float(pt)}


def _scalar_labels(dataset: Dataset) -> bool:
    """Caching indexes samples through the label: only for one integer label per sample."""
    _, y = dataset[0]
    return torch.as_tensor(y).dim() == 0


def _classes(model: nn.Module, example: tuple[Tensor, ...]) -> int:
    with torch.no_grad():
        was = model.training
        out = model.eval()(*example)
        model.train(was)
    return int(out.shape[-1])


def _exit_layers(model: nn.Module, example, layers) -> tuple[list[str], list[tuple[int, ...]]]:
    """Where exit heads go: ``auto`` = every stage end but the last (whose features the final
    head reads already); or the named modules."""
    from lighten.distill.features import produced, stage_ends

    if layers == "auto":
        ends = stage_ends(model, example)[:-1]
        if not ends:
            raise ModelError(f"{type(model).__name__} has one spatial resolution only; name the "
                             "modules that get exit heads: layers: [name, ...]")
        return [p.name for p in ends], [p.shape for p in ends]
    table = {p.name: p for p in produced(model, example)}
    names = list(layers) if not isinstance(layers, Mapping) else list(layers)
    missing = [n for n in names if n not in table]
    if missing:
        from lighten.errors import RecipeError, did_you_mean

        raise RecipeError(f"layers: the student has no module {missing[0]!r} producing a "
                          f"tensor{did_you_mean(missing[0], table)}")
    return names, [table[n].shape for n in names]


def build_exit_heads(model: nn.Module, example, *, num_classes: int, layers="auto",
                     hidden: int = 0) -> ExitHeads:
    """Exit heads for ``model``'s intermediate layers (``auto``: every stage end but the last),
    untrained: the reusable builder early exit starts from."""
    names, shapes = _exit_layers(model, example, layers)
    return ExitHeads(names, [list(s) for s in shapes], num_classes, hidden)


__all__ = ["DistillModule", "Objective", "Teachers", "build_exit_heads", "exit_head"]
