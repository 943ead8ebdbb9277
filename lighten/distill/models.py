"""Teachers and students as first-class models.

A *teacher* is ``baseline`` (the recipe's, the default), a zoo model, a ``python:`` factory with
weights, a lighten artifact file, or an earlier stage of the run (``{stage: prune}``); any of
them can be trained first on the step's data (``train: {epochs: 2}``). Teachers are frozen
copies: eval mode, ``requires_grad`` off, never in an optimizer.

A *student* is the stage's input model (``input``, the default), a zoo / ``python:`` model, or
derived from a base model (the teacher unless another is named): ``width: 0.25`` keeps a
quarter of every channel group (``prune.channels`` surgery), ``depth: 0.5`` removes half of the
residual blocks (``prune.layers``), ``prune: {target_macs: 0.5}`` is a channel-pruned copy
that keeps the base's weights (:func:`derive_student`: width / depth from Python). A
width/depth-derived student is re-initialized (``init: random``); its artifact still starts
from the base's source spec, the resized layers in its edit log.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, model_validator
from torch import nn

from lighten.errors import ModelError, RecipeError, UnsupportedError
from lighten.step import StrictModel


class TrainFirst(StrictModel):
    """``train:`` of a teacher/student that should be trained on the step's data first."""

    epochs: float = Field(1, gt=0)
    lr: float | None = Field(None, gt=0, description="unset: the recipe's train lr")


class ModelRef(StrictModel):
    """One model: exactly one of zoo, python, artifact or stage (or none: see the roles)."""

    zoo: str | None = None
    python: str | None = Field(None, description="'file.py:factory' returning an nn.Module")
    input_shape: list[int] | None = Field(None, description="python: default the data's")
    weights: str | None = Field(None, description=".safetensors / .pt weights or an artifact")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    artifact: str | None = Field(None, description="a lighten artifact (.safetensors) file")
    stage: str | None = Field(None, description="an earlier stage of this run, by name")
    train: TrainFirst | None = Field(None, description="train it on the step's data first")

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo):
        given = [k for k in ("zoo", "python", "artifact", "stage") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one of zoo, python, artifact or stage, not {given}")
        if self.weights and not (self.zoo or self.python):
            raise ValueError("weights go with zoo or python (an artifact has its own)")
        base_dir = (info.context or {}).get("base_dir") if info is not None else None
        if base_dir is not None:  # recipe-relative paths, as the recipe's model: block
            update = {}
            for key in ("python", "weights", "artifact"):
                value = getattr(self, key)
                if not value:
                    continue
                file_part, sep, rest = value.partition(":") if key == "python" else \
                    (value, "", "")
                candidate = Path(base_dir) / file_part
                if not Path(file_part).is_absolute() and candidate.exists():
                    update[key] = f"{candidate.resolve()}{sep}{rest}"
            if update:
                return self.model_copy(update=update)
        return self

    def source(self) -> str | None:
        return next((k for k in ("zoo", "python", "artifact", "stage") if getattr(self, k)),
                    None)


class StudentRef(ModelRef):
    """A student: a model as :class:`ModelRef`, optionally derived (width / depth / prune)."""

    width: float | None = Field(None, gt=0, le=1, description="keep this share of channels")
    depth: float | None = Field(None, gt=0, le=1, description="keep this share of the "
                                "removable residual blocks")
    prune: dict[str, Any] | None = Field(None, description="prune.channels options: a "
                                         "channel-pruned copy that keeps the base's weights")
    init: Literal["keep", "random"] | None = Field(
        None, description="random: re-initialize (default with width/depth); keep: the "
        "weights it has")

    def derived(self) -> bool:
        return self.width is not None or self.depth is not None or self.prune is not None


def parse_ref(value: Any, *, role: str, context: dict | None = None) -> str | ModelRef:
    """``"baseline"`` / ``"input"`` / a ``.safetensors`` path / a mapping, as a model ref."""
    keyword = "baseline" if role == "teacher" else "input"
    if isinstance(value, ModelRef):
        return value
    if isinstance(value, str):
        if value in (keyword, "baseline"):
            return value
        if value.endswith(".safetensors"):
            return parse_ref({"artifact": value}, role=role, context=context)
        raise RecipeError(f"{role}: {value!r} is not a model; give {keyword!r}, an artifact "
                          "path (.safetensors) or a mapping {zoo: ...} / {python: file.py:build, "
                          "weights: ...} / {stage: NAME}")
    if isinstance(value, dict):
        from pydantic import ValidationError

        from lighten.recipe import describe_validation_error

        cls = StudentRef if role == "student" else ModelRef
        try:
            return cls.model_validate(value, context=context)
        except ValidationError as err:  # one line naming the key, not pydantic's header
            raise RecipeError(describe_validation_error(err, cls)) from None
    raise RecipeError(f"{role}: expected a name or a mapping, got {type(value).__name__}")


@dataclass
class Resolved:
    model: nn.Module
    source_spec: dict | None   # how the artifact's edit log starts; None: the input model's
    label: str                 # for notes: "baseline", "zoo resnet20", ...


def _model_spec(ref: ModelRef, ctx) -> dict:
    spec = {"zoo": ref.zoo} if ref.zoo else {"python": ref.python, "input_shape": list(
        ref.input_shape or ctx.input_shape)}
    if ref.kwargs:
        spec["kwargs"] = dict(ref.kwargs)
    return spec


def _build(ref: ModelRef, ctx, *, data=None, shipped: bool = True
           ) -> tuple[nn.Module, dict | None, str]:
    """(model, source spec, label) of a zoo / python / artifact / stage reference; a zoo model
    without weights gets lighten's shipped checkpoint for the data when ``shipped``."""
    from lighten.models import ModelSpec, build_model, load_weights, shipped_checkpoint

    data = data if data is not None else ctx.data
    if ref.artifact or ref.stage:
        from lighten.artifact import load_artifact

        path = Path(ref.artifact) if ref.artifact else _stage_file(ref.stage, ctx)
        if not path.is_file():
            raise ModelError(f"artifact {path} not found; give the path of a lighten "
                             ".safetensors file (a run's stages/NN-<stage>.safetensors)")
        # a stage of this run was built from this recipe's code; another file's python: model
        # runs only when trusted (load_artifact)
        model, manifest = load_artifact(path, trust=bool(ref.stage))
        return model, manifest.get("model_spec"), f"artifact {path.name}"
    spec = _model_spec(ref, ctx)
    model = build_model(ModelSpec(**spec, weights=ref.weights), input_shape=data.input_shape,
                        num_classes=data.num_classes, task=data.task)
    label = f"zoo {ref.zoo}" if ref.zoo else f"python {ref.python}"
    if shipped and ref.zoo and not ref.weights and ref.train is None:
        shipped = shipped_checkpoint(ref.zoo, data.name)
        if shipped is not None:
            model = load_weights(model, shipped)
            label += f" (shipped {shipped.name})"
    return model, spec, label


def _stage_file(name: str, ctx) -> Path:
    found = sorted((Path(ctx.workdir) / "stages").glob(f"[0-9][0-9]-{name}.safetensors"))
    if not found:
        raise ModelError(f"stage {name!r} has no artifact in {Path(ctx.workdir) / 'stages'}; "
                         "name an earlier stage of this run (its steps[].name or step name)")
    return found[-1]


def check_stage_refs(steps, *, where: str) -> None:
    """Refuse, before any work, a ``{stage: NAME}`` teacher / student that names no earlier
    stage of the recipe (a typo, or a later step): it failed only once its step ran."""
    from lighten.errors import did_you_mean
    from lighten.run_folder import stage_names_of

    stages = stage_names_of(steps)
    for i, step in enumerate(steps):
        names = ["baseline", *stages[:i]]
        cfg = step.config
        refs = [getattr(cfg, "teacher", None), getattr(cfg, "student", None),
                *(getattr(cfg, "teachers", None) or []),
                *(t.teacher for t in getattr(cfg, "tasks", None) or []),
                getattr(getattr(cfg, "finetune", None), "teacher", None)]
        for ref in refs:
            stage = ref.stage if isinstance(ref, ModelRef) else (
                ref.get("stage") if isinstance(ref, dict) else None)
            if stage is not None and stage not in names:
                raise RecipeError(f"{where}: steps[{i}] {step.name}: stage {stage!r} is not an "
                                  f"earlier stage of this recipe{did_you_mean(stage, names)}; "
                                  f"earlier stages: {', '.join(names)}")


def train_first(model: nn.Module, ref: ModelRef, ctx, *, data=None, seed: int = 0) -> None:
    """Train ``model`` on ``data`` (default the step's) as ``ref.train`` says, in place."""
    from lighten.training import train

    data = data if data is not None else ctx.data
    base = ctx.train_config
    cfg = base.model_copy(update={"epochs": ref.train.epochs, "seed": seed,
                                  "lr": ref.train.lr or base.lr})
    train(model, data.train, cfg, progress=ctx.progress, task=data.task)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher never trains."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_teacher(value: Any, ctx, *, data=None) -> Resolved:
    """A frozen teacher (a copy: the baseline itself stays as it is)."""
    ref = parse_ref(value, role="teacher")
    if ref == "baseline" and ctx.baseline is None:
        raise ModelError("no baseline model to teach from here: pass baseline= to "
                         "lighten.compress, or name the teacher (zoo, python, artifact)")
    if ref == "baseline":
        return Resolved(freeze(copy.deepcopy(ctx.baseline)), getattr(ctx, "baseline_spec", None),
                        "baseline")
    if ref.source() is None:
        raise RecipeError("teacher: give one of zoo, python, artifact or stage (or 'baseline')")
    model, spec, label = _build(ref, ctx, data=data)
    if ref.train is not None:
        train_first(model, ref, ctx, data=data, seed=ctx.seed)
        label += f" trained {ref.train.epochs:g} epochs"
    elif ref.zoo and not ref.weights and "shipped" not in label:
        raise ModelError(f"teacher zoo {ref.zoo!r} has no weights for {(data or ctx.data).name}: "
                         "give weights: FILE, or train: {epochs: N} to train it first")
    return Resolved(freeze(model), spec, label)


def resolve_student(value: Any, ctx, model: nn.Module, teacher: Resolved | None, *,
                    seed: int) -> Resolved:
    """The student to train: the input ``model`` (a copy stays with the caller), a built model,
    or one derived from a base (the teacher unless the ref names another)."""
    ref = parse_ref(value, role="student")
    if ref in ("input", "baseline"):
        if ref == "baseline":
            return Resolved(copy.deepcopy(ctx.baseline).train(), ctx.baseline_spec, "baseline")
        return Resolved(model, None, "the input model")
    if ref.source() is not None:
        student, spec, label = _build(ref, ctx, shipped=False)  # a zoo student starts fresh
    elif ref.derived():
        if teacher is None:
            raise RecipeError("student: width / depth / prune derive from the teacher; this "
                              "method has none, so name the base (zoo / python / artifact)")
        student, spec, label = copy.deepcopy(teacher.model), teacher.source_spec, teacher.label
        student.train()
        for p in student.parameters():
            p.requires_grad_(True)
        # spec None (lighten.compress knows no baseline spec): the caller saves the student
        # with model_spec=None, or derives from a zoo / python: / artifact teacher
    else:
        raise RecipeError("student: give 'input', a model (zoo / python / artifact / stage) or "
                          "a derivation (width / depth / prune)")
    if ref.derived():
        student, label = _derive(student, ref, ctx, label)
    init = ref.init or ("random" if ref.width is not None or ref.depth is not None else "keep")
    if init == "random":
        student = _reinit(student, seed)
    if ref.train is not None:
        train_first(student, ref, ctx, seed=seed)
    for p in student.parameters():
        p.requires_grad_(True)
    return Resolved(student.train(), spec, label)


def derive_student(base: nn.Module, example: torch.Tensor, *, width: float | None = None,
                   depth: float | None = None, seed: int = 0, target=None,
                   init: Literal["keep", "random"] = "random") -> tuple[nn.Module, list[str]]:
    """A smaller copy of ``base`` (left as it is): ``depth`` keeps that share of its removable
    residual blocks (chosen at random, seeded), ``width`` that share of every channel group;
    ``init: random`` re-initializes it (seeded). Returns the student (train mode) and what was
    done, for notes."""
    student = copy.deepcopy(base).train()
    for p in student.parameters():
        p.requires_grad_(True)
    parts = _shrink(student, width, depth, example, seed=seed, target=target)
    if init == "random":
        student = _reinit(student, seed)
    return student, parts


def _shrink(model: nn.Module, width: float | None, depth: float | None, example, *, seed: int,
            target) -> list[str]:
    from lighten.prune.layers import LayerPruneConfig, prune_layers_
    from lighten.prune.structured import ChannelPruneConfig, prunable_groups, prune_channels_

    parts = []
    if depth is not None and depth < 1:
        try:
            report = prune_layers_(model, LayerPruneConfig(ratio=1 - depth, importance="random"),
                                   example, seed=seed)
        except UnsupportedError as err:
            raise UnsupportedError(f"student depth: {err}; depth removes residual blocks, so "
                                   "use width or name a smaller student model (zoo / python) "
                                   "instead") from None
        parts.append(f"depth {depth:g} ({len(report.removed)} blocks removed)")
    if width is not None and width < 1:
        # every group: conv channels and Linear-made neurons (an MLP has only the latter)
        counts = []
        for scope in ("channels", "neurons"):
            if not prunable_groups(model, example, scope=scope):
                continue
            report = prune_channels_(model, ChannelPruneConfig(ratio=1 - width), example,
                                     scope=scope, seed=seed, target=target)
            counts.append(f"{report.channels_after}/{report.channels_before} {scope}")
        if not counts:
            raise UnsupportedError("student width: the base model has no prunable channels or "
                                   "neurons (every group is pinned by the input or output); "
                                   "name a smaller student model (zoo / python) instead")
        parts.append(f"width {width:g} ({', '.join(counts)})")
    return parts


def _derive(model: nn.Module, ref: StudentRef, ctx, label: str) -> tuple[nn.Module, str]:
    from lighten.prune.structured import ChannelPruneConfig, prune_channels_

    example = ctx.example_input(2)
    parts = _shrink(model, ref.width, ref.depth, example, seed=ctx.seed, target=ctx.target)
    if ref.prune is not None:
        try:
            cfg = ChannelPruneConfig(**ref.prune)
        except Exception as err:
            raise RecipeError(f"student prune: {err}".splitlines()[0]) from None
        report = prune_channels_(model, cfg, example, seed=ctx.seed, target=ctx.target,
                                 batches=lambda: ctx.labelled_batches(cfg.calibration_samples))
        parts.append(report.summary("pruned copy"))
    return model, f"{label}, " + ", ".join(parts)


def _reinit(model: nn.Module, seed: int) -> nn.Module:
    """Fresh weights for every layer that knows how to reset itself (seeded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    return model
