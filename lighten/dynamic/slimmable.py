"""``dynamic.slimmable``: one set of weights that runs at several width multipliers (Slimmable
Networks, Yu et al. 2018; the sandwich rule and in-place distillation of Universally Slimmable
Networks, Yu & Huang 2019).

Order of work: find which channels are sliced together (lighten.graph's channel groups, the
ones prune.channels uses: a residual add ties both branches), replace the convs/Linears by
slimmable layers that use each group's first ``ceil(w x C)`` channels at width ``w`` and every
BatchNorm by a switchable one (private statistics and affine per width,
:mod:`.slimmable_layers`), then train all widths in one run: each batch runs the widest width,
the narrowest and ``widths_per_batch - 2`` random others on the labels (with ``inplace_distill``
the narrower ones learn the widest's detached outputs instead), and sums the losses.

The stage's model is a :class:`SlimmableModel`: one artifact holding every width; its forward
runs the width ``width`` (default 1.0; :meth:`SlimmableModel.set_width` changes it). Deployed,
a width is a plain model: :meth:`SlimmableModel.at_width` slices the weights physically and
keeps that width's BatchNorms; :mod:`.slimmable_runtime` writes it as ONNX (``export_width``,
``lighten export --width w``), times each width on ONNX Runtime here and picks the widest that
meets a latency budget (``pick_width``).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from lighten.dynamic.slimmable_layers import (
    SLIM_TYPES,
    SwitchableBatchNorm,
    make_slimmable_,
    materialize,
    plan_widths,
    set_active_,
)
from lighten.errors import CheckpointError, UnsupportedError
from lighten.modules import register_module_type
from lighten.registry import register_step
from lighten.step import FinetuneConfig, StepConfig, StepContext


class SlimmableFinetuneConfig(FinetuneConfig):
    """``finetune:`` of dynamic.slimmable: training the narrow widths is re-training, so the
    learning rate defaults to the recipe's train lr (scale 1.0)."""

    lr_scale: float = Field(1.0, gt=0, description="without lr: the fine-tune lr is this "
                            "multiple of the recipe's train lr (dynamic.slimmable: 1.0)")


class SlimmableConfig(StepConfig):
    """``dynamic.slimmable``: the widths one set of weights runs at, and how they train."""

    widths: list[float] = Field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25],
                                description="width multipliers; 1.0 (the full model) included")
    width: float = Field(1.0, description="the width the stage's model runs and exports at")
    widths_per_batch: int = Field(4, ge=2, description="sandwich rule: widths trained per "
                                  "batch (the widest, the narrowest and random others)")
    # labels by default: on digits (the tests' residual net, SGD) in-place distillation left
    # every width 10-20 points lower after 3 epochs (width 1.0: 82.8% vs 97.5%): the widest's
    # early outputs are poor targets that 3 of 4 losses chase. With labels, 10 epochs: 99.2 /
    # 98.6 / 98.6 / 97.2% at 1.0 / 0.75 / 0.5 / 0.25 vs 99.4 / 98.9 / 97.5 / 94.4% trained alone
    inplace_distill: bool = Field(False, description="narrower widths learn the widest width's "
                                  "outputs (detached) instead of the labels (US-Nets; for long "
                                  "schedules)")
    round_to: int = Field(1, ge=1, description="channels of each width: a multiple of this")
    calibration_samples: int = Field(512, ge=1, description="finetune epochs 0: samples that "
                                     "re-estimate each width's BatchNorm statistics")
    ignore: list[str] = Field(default_factory=list, description="layers whose output channels "
                              "stay at full width")
    finetune: SlimmableFinetuneConfig | None = None

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < w <= 1 for w in v):
            raise ValueError(f"widths must lie in (0, 1], got {v}")
        if max(v) != 1.0:
            raise ValueError(f"widths must include 1.0 (the full model holds the shared "
                             f"weights), got {v}")
        return sorted(set(float(w) for w in v), reverse=True)

    @model_validator(mode="after")
    def _width_is_one_of_them(self):
        if all(abs(self.width - w) > 1e-6 for w in self.widths):
            raise ValueError(f"width {self.width} is not among widths {self.widths}")
        return self


@register_module_type
class SlimmableModel(nn.Module):
    """``backbone`` with slimmable layers; runs at ``widths[index]`` (widest first)."""

    structure_fixed_by = "dynamic.slimmable"  # lighten.graph: no channel surgery after it

    artifact_type = "lighten.dynamic:SlimmableModel"

    def __init__(self, backbone: nn.Module, widths: list[float], *, width: float = 1.0,
                 backbone_spec: dict | None = None, input_shape=None, num_classes=None,
                 task: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.widths = [float(w) for w in widths]
        self.backbone_spec = backbone_spec
        self.input_shape = None if input_shape is None else [int(d) for d in input_shape]
        self.num_classes = None if num_classes is None else int(num_classes)
        self.task = task
        self.index = self.width_index(width)

    # ----------------------------------------------------------------- widths
    @property
    def width(self) -> float:
        return self.widths[self.index]

    def width_index(self, width: float) -> int:
        for i, w in enumerate(self.widths):
            if abs(w - float(width)) < 1e-6:
                return i
        raise UnsupportedError(f"width {width} is not one this model was trained for; choose "
                               f"one of {self.widths}")

    def set_width(self, width: float) -> SlimmableModel:
        """Run (and export) at ``width`` from now on."""
        self.index = self.width_index(width)
        return self

    def at_width(self, width: float | None = None) -> nn.Module:
        """The plain model of one width (default: the current one): standard layers, weights
        physically sliced, that width's BatchNorms; computes what this model does at it."""
        a = self.index if width is None else self.width_index(width)
        return materialize(self.backbone, a).eval()

    def forward(self, *inputs: Tensor) -> Tensor:
        set_active_(self.backbone, self.index)
        return self.backbone(*inputs)

    # ----------------------------------------------------------------- deployment
    def onnx_graph(self, specs, *, opset: int = 17):
        """The deployed graph: the plain model of the current width (no slicing at run time)."""
        from lighten.export import _torch_export

        return _torch_export(self.at_width(), specs, opset)

    def dynamic_measure(self, dataset, **kwargs) -> dict[str, Any]:
        """Per-width accuracy / MACs / latency (:func:`.slimmable_runtime.measure_widths`)."""
        from lighten.dynamic.slimmable_runtime import measure_widths

        return measure_widths(self, dataset, **kwargs)

    # ----------------------------------------------------------------- artifact
    def artifact_config(self) -> dict[str, Any]:
        if self.backbone_spec is None:
            raise CheckpointError("cannot save a SlimmableModel whose backbone_spec is unknown: "
                                  "set model.backbone_spec (e.g. {'zoo': 'resnet20'}) before "
                                  "saving, or run dynamic.slimmable from a recipe")
        return {"backbone_spec": self.backbone_spec, "input_shape": self.input_shape,
                "num_classes": self.num_classes, "task": self.task, "widths": self.widths,
                "width": self.width}

    @classmethod
    def from_artifact(cls, config: dict) -> SlimmableModel:
        """The backbone rebuilt from its spec; the slimmable layers come from the edit log."""
        from lighten.models import ModelSpec, build_model
        from lighten.task import task_from_dict

        spec = ModelSpec(**{k: v for k, v in config["backbone_spec"].items() if k != "weights"})
        task = task_from_dict(config["task"]) if config.get("task") else None
        with torch.random.fork_rng(devices=[]):
            backbone = build_model(spec, input_shape=tuple(config["input_shape"]),
                                   num_classes=config["num_classes"], task=task)
        return cls(backbone, config["widths"], width=config["width"],
                   backbone_spec=config["backbone_spec"], input_shape=config["input_shape"],
                   num_classes=config["num_classes"], task=config.get("task"))


# --------------------------------------------------------------------------- the step


@register_step("dynamic.slimmable", SlimmableConfig,
               needs_data=lambda c: "labelled training data (every width is trained)")
def slimmable(model: nn.Module, cfg: SlimmableConfig, ctx: StepContext) -> nn.Module:
    """One set of weights at several widths (switchable BN), trained with the sandwich rule."""
    from lighten.dynamic.early_exit import zoo_spec
    from lighten.modules import require_modules

    if isinstance(model, SlimmableModel) or any(isinstance(m, SLIM_TYPES)
                                                for m in model.modules()):
        raise UnsupportedError("dynamic.slimmable: the model is slimmable already; apply the "
                               "step once")
    require_modules(model, cfg.ignore, key="dynamic.slimmable ignore")
    width = float(cfg.width)
    specs = ctx.task.inputs
    if len(specs) != 1 or not specs[0].is_float:
        raise UnsupportedError("dynamic.slimmable needs a model with one float input (its "
                               "widths are exported and timed on ONNX Runtime for it)")
    x = ctx.example_input(1)
    keeps, groups, kept_whole = plan_widths(model, x, cfg.widths, ignore=cfg.ignore,
                                            round_to=cfg.round_to)
    backbone = copy.deepcopy(model)
    make_slimmable_(backbone, keeps, len(cfg.widths))
    spec = getattr(ctx, "model_spec", None) or zoo_spec(model, ctx)
    sm = SlimmableModel(backbone, cfg.widths, backbone_spec=spec,
                        input_shape=list(ctx.input_shape), num_classes=ctx.task.num_classes,
                        task=ctx.task.describe())
    _check_widths(model, sm, ctx.task.random_inputs(2, seed=ctx.seed)[0])
    ft = cfg.finetune or SlimmableFinetuneConfig(epochs=1)
    if cfg.finetune is None:
        ctx.note("dynamic.slimmable: no finetune: given; training every width for 1 epoch "
                 "(set finetune: {epochs: N})")
    if ft.epochs:
        term = sandwich_term(sm, ctx.task, per_batch=cfg.widths_per_batch,
                             distill=cfg.inplace_distill, seed=ctx.seed)
        sm = ctx.finetune(sm, ft, loss_terms=[term])
    else:
        recalibrate_bn_(sm, ctx.calibration_batches(cfg.calibration_samples))
        ctx.note("dynamic.slimmable: finetune epochs 0: only each width's BatchNorm statistics "
                 "were re-estimated; narrow widths stay untrained")
    sm.set_width(width).eval()
    _record(ctx, sm, groups, kept_whole, x)
    return sm


def _check_widths(model: nn.Module, sm: SlimmableModel, x: Tensor) -> None:
    """Width 1.0 computes what the model did; every width runs (a shape the analysis missed
    is one error here, not a crash in training)."""
    was = model.training
    model.eval()
    sm.eval()
    try:
        with torch.no_grad():
            ref = model(x)
            for w in sm.widths:
                sm.set_width(w)
                try:
                    out = sm(x)
                except RuntimeError as err:
                    raise UnsupportedError(f"dynamic.slimmable: the model cannot run at width "
                                           f"{w} ({str(err).splitlines()[0][:160]}); pass the "
                                           "layer involved in ignore:") from None
                if w == 1.0 and not torch.allclose(out, ref, atol=1e-5, rtol=1e-4):
                    raise UnsupportedError("dynamic.slimmable: the slimmable model at width 1.0 "
                                           "does not compute the model's outputs; please report"
                                           " this model")
    finally:
        model.train(was)
        sm.set_width(1.0)


def sandwich_term(sm: SlimmableModel, task, *, per_batch: int = 4, distill: bool = False,
                  seed: int = 0):
    """A ``LossTerm``: the training loop's forward runs the widest width; this adds the loss of
    the narrowest and ``per_batch - 2`` random other widths on the same batch, each learning
    the widest's detached outputs (``distill``) or the labels. One backward trains them all."""
    gen = random.Random(seed)
    n = len(sm.widths)

    def term(model: nn.Module, x, outputs: Tensor, y: Tensor) -> Tensor:
        if isinstance(outputs, dict):  # finetune: distill wraps the model (lighten.distill)
            outputs = outputs["students"][0]
            if outputs.dim() == 2 and y.dim() == 2:  # labels [y, index] of cached teachers
                y = y[:, 0]
        total = outputs.new_zeros(())
        if not sm.training or n == 1:
            return total
        middle = list(range(1, n - 1))
        picked = sorted(gen.sample(middle, min(len(middle), per_batch - 2))) + [n - 1]
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        soft = F.softmax(outputs.detach().float(), dim=-1)
        try:
            for a in picked:
                sm.index = a
                out = sm(*inputs)
                if distill:
                    total = total - (soft * F.log_softmax(out, dim=-1)).sum(-1).mean()
                else:
                    total = total + task.loss(out, y)
        finally:
            sm.index = 0
        return total

    return term


def recalibrate_bn_(sm: SlimmableModel, batches) -> None:
    """Each width's BatchNorm statistics re-estimated (cumulative average) on ``batches``."""
    batches = list(batches)
    was, index = sm.training, sm.index
    bns = [m for m in sm.modules() if isinstance(m, SwitchableBatchNorm)]
    with torch.no_grad():
        for a in range(len(sm.widths)):
            saved = []
            for m in bns:
                bn = m.bns[a]
                bn.reset_running_stats()
                saved.append(bn.momentum)
                bn.momentum = None
            sm.train()
            sm.index = a
            for b in batches:
                sm(*(b if isinstance(b, tuple) else (b,)))
            for m, momentum in zip(bns, saved, strict=True):
                m.bns[a].momentum = momentum
    sm.index = index
    sm.train(was)


def width_facts(sm: SlimmableModel, x: Tensor) -> list[dict]:
    """Per width: MACs and parameters of its plain model (counted, not estimated)."""
    from lighten.measure.macs import count_macs

    facts = []
    for w in sm.widths:
        plain = sm.at_width(w)
        facts.append({"width": w, "macs": int(count_macs(plain, x)),
                      "params": int(sum(p.numel() for p in plain.parameters()))})
    return facts


def _record(ctx: StepContext, sm: SlimmableModel, groups, kept_whole, x) -> None:
    from lighten.dynamic.slimmable_layers import width_channels

    facts = width_facts(sm, x)
    full = facts[0]["macs"]
    for g in groups:
        name = g.producers()[0].module
        per = [width_channels(g.size, w) for w in sm.widths]
        ctx.layer(f"backbone.{name}", "slimmable", before=f"{g.size} ch",
                  after="/".join(str(k) for k in per) + " ch", channels=per)
    for note in kept_whole:
        ctx.note(f"dynamic.slimmable: {note}")
    ctx.summary.update(dynamic={
        "kind": "slimmable", "width": sm.width, "slimmed_groups": len(groups),
        "widths": [{**f, "macs_ratio": f["macs"] / full} for f in facts]})
    ctx.note("dynamic.slimmable: widths " + ", ".join(
        f"{f['width']:g} ({f['macs'] / full:.2f}x MACs)" for f in facts)
        + f"; the stage runs and exports width {sm.width:g}")


__all__ = ["SlimmableConfig", "SlimmableModel", "recalibrate_bn_", "sandwich_term", "slimmable",
           "width_facts"]
