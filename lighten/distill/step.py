"""The ``distill`` step: train a student from a teacher; the trained student is the stage.

```yaml
- distill: {method: hinton, teacher: baseline, student: {python: student.py:build}}
- distill: {method: dkd, teacher: {python: t.py:build, weights: t.safetensors},
           student: {zoo: lenet5}}
- distill: {method: hint, layers: auto}          # also attention, relational, self
- distill: {method: mutual, peers: 2}
- distill: {method: ensemble, teachers: [baseline, {python: t2.py:build, weights: t2.safetensors}]}
- distill: {method: multitask, tasks: [{data: {name: fashion-mnist}},
                                      {data: {name: mnist}, teacher: ...}]}
```

``augment: {crop: 2, flip: true, mixup: 0.2, views: 4}`` is consistent teaching (Beyer et al.
2022): the student and the teacher see the same randomly cropped / flipped / mixed view of each
image, the labels follow the view (a mixed image's label is mixed), and with ``views: K`` the
teacher's logits are cached once for K fixed views of the training set (K teacher passes)
instead of running it every step. A label-only student through this step (``losses: {ce: 1}``)
gets the same views, so the comparison is fair.

Each method is a default composition of registered losses (:data:`METHOD_LOSSES`); ``losses:``
replaces it (``{hinton: 1, attention: 1000}``). The student's source spec becomes the stage's
(``ctx.source_spec``), so its artifact rebuilds from the student's own zoo / python: model, or
from the teacher's spec plus the resized layers for a derived student.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from lighten.distill.augment import AugmentConfig
from lighten.distill.losses import LOSSES, LossParams
from lighten.distill.models import parse_ref, resolve_student, resolve_teacher
from lighten.registry import register_step
from lighten.step import FinetuneConfig, StepConfig, StepContext, StrictModel

Method = Literal["hinton", "dkd", "dkd_ls", "hinton_ls", "dist", "hint", "attention",
                 "relational", "self", "mutual", "ensemble", "multitask"]

# method -> the losses it trains with, {name: weight}. Feature methods add their term to Hinton
# KD (the combination torchdistill / RepDistiller report); weights: RepDistiller's defaults
# (attention 1000, RKD distance 25 / angle 50 inside `relational`).
METHOD_LOSSES: dict[str, dict[str, float]] = {
    "hinton": {"hinton": 1.0},
    "dkd": {"ce": 1.0, "dkd": 1.0},
    "dkd_ls": {"ce": 1.0, "dkd_ls": 1.0},  # DKD on z-scored logits (Sun et al. 2024)
    "hinton_ls": {"hinton_ls": 1.0},  # logit standardization (Sun et al. 2024)
    "dist": {"ce": 1.0, "dist": 1.0},  # DIST (Huang et al. 2022); its weight: losses:
    "hint": {"hinton": 1.0, "hint": 1.0},
    "attention": {"hinton": 1.0, "attention": 1000.0},
    "relational": {"hinton": 1.0, "relational": 1.0},
    "self": {"ce": 1.0, "self": 1.0},
    "mutual": {"ce": 1.0, "mutual": 1.0},
    "ensemble": {"hinton": 1.0},
    "multitask": {"hinton": 1.0},
}


class DistillFinetuneConfig(FinetuneConfig):
    """``finetune:`` of the distill step: how long and how fast the student trains (a fresh
    student trains at the recipe's lr: ``lr_scale`` 1)."""

    epochs: float = Field(3, gt=0, description="epochs of student training (> 0: the "
                          "stage is the trained student, never an untrained one)")
    lr_scale: float = Field(1.0, gt=0, description="without lr: this multiple of train lr")

    @model_validator(mode="after")
    def _own_keys(self):
        if self.distill or self.teacher is not None or self.loss is not None:
            raise ValueError("the distill step's teacher and losses are its own keys (teacher:, "
                             "method:, losses:); remove distill / teacher / loss from finetune")
        return self


class TaskRef(StrictModel):
    """One task of ``method: multitask``: its data, its teacher, its loss weight."""

    data: dict[str, Any]
    teacher: Any = "baseline"
    weight: float = Field(1.0, gt=0)
    name: str | None = None

    @field_validator("data")
    @classmethod
    def _data(cls, v):
        from lighten.data import DataSpec

        DataSpec(**v)  # one error now rather than mid-run
        return v


class DistillConfig(StepConfig):
    method: Method = "hinton"
    teacher: Any = Field("baseline", description="'baseline', an artifact path, {zoo: ...}, "
                         "{python: t.py:build, weights: ...}, {stage: NAME}; + train: {epochs}")
    teachers: list[Any] | None = Field(None, description="ensemble: the teachers")
    weights: Literal["equal", "accuracy"] | list[float] = Field(
        "equal", description="ensemble: teacher weights, fixed or from each one's accuracy on the "
        "validation split (else training images; never the test split)")
    student: Any = Field("input", description="'input' (the stage's model), {zoo: ...}, "
                         "{python: s.py:build}, or derived: {width: 0.25} / {depth: 0.5} / "
                         "{prune: {target_macs: 0.5}}")
    losses: dict[str, float] | None = Field(None, description="{loss: weight}; replaces the "
                                            "method's default composition")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of every soft-"
                               "target loss; 2: the CIFAR-100 recipes' 4 over-flattens a "
                               "calibrated teacher for a small student (benchmarks/distill.py)")
    alpha: float = Field(0.5, ge=0, le=1, description="hinton: weight of the soft targets "
                         "(1 - alpha on the labels); 0.5: mdistiller's 0.9 starves a short "
                         "training of the labels (LeNet-5 from ResNet-20: 0.9 / T 4 lost 0.9 "
                         "points to the labels alone in 10 epochs)")
    beta: float = Field(2.0, ge=0, description="dkd: weight of the non-target part (NCKD); "
                        "mdistiller uses 8 on CIFAR-100 and 0.5 on ImageNet; 8 left a LeNet-5 "
                        "at chance after a short Fashion-MNIST / digits training")
    warmup: float = Field(0.25, ge=0, le=1, description="dkd: its term ramps up linearly over "
                          "this share of the training steps (mdistiller warms up too)")
    layers: Literal["auto"] | list[str] | dict[str, str] = Field(
        "auto", description="feature layers: auto (by resolution), [names] or {student: teacher}")
    peers: int = Field(2, ge=2, description="mutual: students trained together")
    gate: bool | Literal["auto"] = Field(
        "auto", description="mutual: a peer teaches a sample only where it gives the true class "
        "more probability (loss mutual_gated); auto: on when the student arrives trained "
        "(a fresh peer would pull it toward its mistakes: 90.4 -> 89.5% in 2 epochs), off "
        "from scratch (the paper's loss, which pays more there)")
    tasks: list[TaskRef] | None = Field(None, description="multitask: [{data, teacher}, ...]")
    keep_heads: bool = Field(False, description="self: keep the exit heads in the saved model")
    head_hidden: int = Field(0, ge=0, description="self: hidden width of each exit head")
    cache_teacher: bool = Field(True, description="cache teacher logits when the data is fixed")
    augment: AugmentConfig | None = Field(
        None, description="consistent teaching: {crop, flip, mixup, views}; student and teacher "
        "see the same augmented view (lighten.distill.augment); views: K caches the teacher "
        "on K fixed views, 0 runs it live")
    finetune: DistillFinetuneConfig = Field(default_factory=DistillFinetuneConfig)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo):
        context = info.context if info is not None else None
        if self.losses is not None:
            unknown = [n for n in self.losses if n not in LOSSES]
            if unknown:
                raise ValueError(f"unknown loss {unknown[0]!r}; known: {', '.join(LOSSES)}")
        if (self.method == "ensemble") != (self.teachers is not None):
            raise ValueError("teachers: [...] goes with method: ensemble (and it needs them)")
        if self.method == "ensemble" and len(self.teachers) < 2:
            raise ValueError("method: ensemble needs at least two teachers")
        if isinstance(self.weights, list) and len(self.weights) != len(self.teachers or []):
            raise ValueError(f"weights: {len(self.weights)} numbers for "
                             f"{len(self.teachers or [])} teachers")
        if (self.method == "multitask") != (self.tasks is not None):
            raise ValueError("tasks: [...] goes with method: multitask (and it needs them)")
        if self.method == "multitask" and len(self.tasks) < 2:
            raise ValueError("method: multitask needs at least two tasks")
        if self.augment is not None and self.method == "multitask":
            raise ValueError("augment goes with one training set; method: multitask mixes "
                             "several (remove augment)")
        for key in ("peers", "gate"):
            if key in self.model_fields_set and self.method != "mutual":
                raise ValueError(f"{key} goes with method: mutual")
        if "gate" in self.model_fields_set and self.losses is not None:
            raise ValueError("gate picks the loss of method mutual's default; with losses: "
                             "name mutual or mutual_gated yourself")
        refs = {"teacher": self.teacher, "student": self.student}
        for i, t in enumerate(self.teachers or []):
            refs[f"teachers[{i}]"] = t
        for i, t in enumerate(self.tasks or []):
            refs[f"tasks[{i}].teacher"] = t.teacher
        parsed = {}
        for where, value in refs.items():
            try:
                parsed[where] = parse_ref(value, role="student" if where == "student" else
                                          "teacher", context=context)
            except Exception as err:
                raise ValueError(f"{where}: {str(err).splitlines()[0]}") from None
        # keep the parsed refs: their paths are resolved against the recipe's folder
        update = {k: parsed[k] for k in ("teacher", "student") if not isinstance(parsed[k], str)}
        if self.teachers is not None:
            update["teachers"] = [parsed[f"teachers[{i}]"] for i in range(len(self.teachers))]
        if self.tasks is not None:
            update["tasks"] = [t.model_copy(update={"teacher": parsed[f"tasks[{i}].teacher"]})
                               for i, t in enumerate(self.tasks)]
        return self.model_copy(update=update)

    def loss_weights(self) -> dict[str, float]:
        return dict(self.losses) if self.losses is not None else dict(METHOD_LOSSES[self.method])

    def loss_params(self) -> LossParams:
        return LossParams(temperature=self.temperature, alpha=self.alpha, dkd_beta=self.beta)


@register_step("distill", DistillConfig, needs_data=lambda c: "labelled training data")
def distill(model: nn.Module, config: DistillConfig, ctx: StepContext) -> nn.Module:
    """Train a student from a teacher (or peers, teachers, tasks); the student is the stage."""
    if config.method == "multitask":
        from lighten.distill.multitask import distill_multitask

        return distill_multitask(model, config, ctx)
    from lighten.distill.objective import Objective

    losses = config.loss_weights()
    _check_outputs_fit(losses, ctx.task)
    teachers, labels = _teachers(config, ctx, losses)
    first = teachers[0] if teachers else None
    student = resolve_student(config.student, ctx, model, first, seed=ctx.seed)
    students = [student.model]
    if config.method == "mutual":
        from lighten.distill.mutual import gate_peers, make_peers

        students = make_peers(student.model, config.peers, seed=ctx.seed)
        if config.losses is None and gate_peers(students, config.gate, ctx):
            losses = {"ce": 1.0, "mutual_gated": 1.0}
    weights = _ensemble_weights(config, teachers, ctx) if config.method == "ensemble" else None
    augment = bool(getattr(ctx.train_config, "augment", False))
    if augment and config.augment is not None:
        from lighten.errors import RecipeError

        raise RecipeError("distill augment and train.augment would augment twice; keep the "
                          "distill step's augment (teacher and student see the same view) and "
                          "set train.augment: false")
    objective = Objective(
        students, task=ctx.task, train_set=ctx.data.train, example=ctx.example_inputs(2),
        losses=losses, params=config.loss_params(), teachers=[t.model for t in teachers],
        teacher_weights=weights, layers=config.layers, exit_layers=config.layers,
        head_hidden=config.head_hidden, num_classes=ctx.data.num_classes,
        cache=config.cache_teacher and config.finetune.epochs >= 1 and not augment,
        warmup_steps=_warmup_steps(config, ctx), augment=config.augment)
    _describe(ctx, config, student.label, labels, objective)
    try:
        ctx.finetune(objective.module, config.finetune, dataset=objective.dataset,
                     task=objective.task)
    finally:
        objective.close(keep_heads=config.keep_heads)
    result = students[0]
    if config.method == "mutual":
        from lighten.distill.mutual import choose_peer

        result = choose_peer(students, ctx)
    if student.source_spec is not None:
        ctx.source_spec = student.source_spec
        ctx.summary["source_spec"] = student.source_spec
    return result.eval()


def _check_outputs_fit(losses: dict[str, float], task) -> None:
    """Soft-target losses compare softmaxes of the outputs: refused, with the losses that do
    apply, where the task's outputs are not class logits (a regression, say)."""
    from lighten.distill.losses import get_loss
    from lighten.errors import RecipeError

    soft = [name for name in losses if "class_logits" in get_loss(name).needs]
    if soft and not getattr(task, "class_logits", False):
        raise RecipeError(
            f"distill loss {', '.join(soft)} compares class probabilities, but the {task.kind} "
            "task's outputs are not class logits; give the step losses that do not, e.g. "
            "losses: {ce: 1, hint: 1} (or attention, relational in place of hint), or, if the "
            "outputs are class logits, set class_logits = True on the task (or subclass "
            "lighten.task.ClassLogitsTask)")


def _warmup_steps(config: DistillConfig, ctx: StepContext) -> int:
    """Training steps over which the dkd term ramps up (0: none)."""
    import math

    batch = config.finetune.batch_size or ctx.train_config.batch_size
    total = config.finetune.epochs * math.ceil(len(ctx.data.train) / batch)
    return math.ceil(config.warmup * total)


def _teachers(config: DistillConfig, ctx: StepContext, losses: dict[str, float]):
    """The frozen teachers this config trains from (none for self / mutual unless named)."""
    from lighten.distill.losses import get_loss

    needs = set().union(*(get_loss(n).needs for n in losses))
    if config.method == "ensemble":
        refs = list(config.teachers)
    elif "teacher" not in config.model_fields_set and not (
            needs & {"teacher", "features", "embeddings"}):
        refs = []  # self / mutual / losses: {ce: 1} learn without a teacher
    else:
        refs = [config.teacher]
    resolved = [resolve_teacher(r, ctx) for r in refs]
    return resolved, [t.label for t in resolved]


def _ensemble_weights(config: DistillConfig, teachers, ctx: StepContext) -> list[float]:
    from lighten.distill.selection import selection_split
    from lighten.training import evaluate

    on, where = selection_split(ctx)  # never the test split (lighten.distill.selection)
    accuracies = [evaluate(t.model, on, task=ctx.task) for t in teachers]
    for t, acc in zip(teachers, accuracies, strict=True):
        ctx.layer(f"teacher {t.label}", "teach", after=f"accuracy {acc:.4f} on {where}",
                  accuracy=acc)
    ctx.summary["teacher_accuracy"] = accuracies
    if isinstance(config.weights, list):
        return list(config.weights)
    if config.weights == "accuracy":
        ctx.note(f"ensemble weights from each teacher's accuracy on {where}: "
                 + ", ".join(f"{a:.4f}" for a in accuracies))
        return accuracies
    return [1.0] * len(teachers)


def _describe(ctx: StepContext, config: DistillConfig, student: str, teachers: list[str],
              objective) -> None:
    losses = ", ".join(f"{w:g} x {n}" for n, w in objective.losses.items())
    who = " + ".join(teachers) if teachers else "no teacher"
    ctx.note(f"distill {config.method}: student {student} from {who}; loss {losses}")
    params = sum(p.numel() for p in objective.students[0].model.parameters())
    ctx.layer("", "train student", before=who, after=f"{student}: {params:,} parameters",
              reason=f"loss {losses}")
    for st in objective.students:
        for s_name, t_name, key in st.pairs:
            adapter = type(objective.module.extras[key]).__name__ if key else "no adapter"
            ctx.layer(s_name, "match", before=f"teacher {t_name}", after=adapter,
                      reason="feature pair")
        for name in st.exits:
            ctx.layer(name, "exit head", after="kept" if config.keep_heads else
                      "training only", reason="self-distillation")
    if objective.cached is not None and config.augment is not None:
        a = config.augment
        ctx.note(f"consistent teaching: {a.views} fixed views of each of the "
                 f"{len(objective.dataset)} training images (crop {a.crop}, flip {a.flip}, "
                 f"mixup {a.mixup:g}), teacher logits cached once per view")
    elif config.augment is not None:
        ctx.note("consistent teaching: a fresh augmented view every step, the teacher run on "
                 "the same view")
    elif objective.cached is not None:
        maps = (f" and {len(objective.cached_features)} feature maps (bfloat16, "
                f"{objective.feature_cache_bytes / 1e6:,.0f} MB)" if objective.cached_features
                else "")
        ctx.note(f"teacher logits{maps} cached once for {len(objective.dataset)} training "
                 "samples (fixed data, no augmentation)")
    elif objective.feature_cache_refused:
        from lighten.distill.objective import FEATURE_CACHE_BYTES

        ctx.note(f"the teacher's feature maps would take {objective.feature_cache_bytes / 1e9:.1f}"
                 f" GB for {len(objective.dataset)} samples (cache limit "
                 f"{FEATURE_CACHE_BYTES / 1e9:.1f} GB): the teacher runs every step")
    if objective.teacher_fit is not None:
        fit = objective.teacher_fit
        ctx.note(f"teacher on the training set: top-1 {fit['train_accuracy']:.4f}, mean "
                 f"true-class probability {fit['true_class_prob']:.3f} (T 1), "
                 f"{fit['true_class_prob_at_t']:.3f} (T {config.temperature:g})")
        ctx.summary["teacher_fit"] = fit
        classes = getattr(ctx.data, "num_classes", None)
        if classes and fit["train_accuracy"] < 2.0 / classes:
            ctx.note(f"warning: the teacher is near chance on the training set (top-1 "
                     f"{fit['train_accuracy']:.2%}, {classes} classes): an untrained teacher "
                     "teaches noise; give it weights: FILE or train: {epochs: N}")
    ctx.summary.update(method=config.method, losses=dict(objective.losses),
                       teachers=teachers, student=student)
