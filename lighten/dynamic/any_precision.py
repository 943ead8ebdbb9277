"""``dynamic.any_precision``: one stored model whose int8 weight codes hold its lower-precision
models in their most-significant bits; the precision is chosen when loading or exporting.

Every Conv / Linear becomes a nested layer (:mod:`lighten.dynamic.any_precision_layers`: the
``b``-bit weight is ``((codes >> (8 - b)) + 0.5) * scale_b``) and every BatchNorm one
BatchNorm per width. Training is QAT with straight-through floors at all widths at once: the
shared loop's loss at the widest width plus, per step, the loss of every narrower width
(optionally distilled from the widest, ``distill``). The artifact stores one int8 code tensor
per layer and one scale row per width; nothing per width is stored twice.

Choosing a precision: ``model.set_precision(4)``, ``load_artifact(path, bits=4)``,
``lighten export MODEL --bits 4``. Each precision deploys as a plain float model whose weights
are dequantized from its derived codes (:meth:`AnyPrecisionModel.plain`); the ONNX file of a
precision is that model.
"""

from __future__ import annotations

import copy
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lighten.dynamic.any_precision_layers import (
    MAX_BITS,
    NestedTrainer,
    PrecisionBatchNorm,
    _NestedStorage,
    bn_dims,
    is_switchable,
    nestable,
)
from lighten.errors import CheckpointError, ModelError, UnsupportedError
from lighten.modules import register_module_type
from lighten.registry import register_step
from lighten.step import FinetuneConfig, StepConfig, StepContext


class AnyPrecisionConfig(StepConfig):
    """``dynamic.any_precision``: the precisions one set of nested weights serves."""

    bits: list[int] = Field(default_factory=lambda: [8, 4, 2], description="weight bit widths "
                            "served by one artifact; the largest is stored, the others are its "
                            "top bits")
    distill: float = Field(0.0, ge=0, description="weight of each narrower width's soft-target "
                           "loss against the widest width's outputs (in-place distillation)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature for distill")
    switchable_bn: bool = Field(True, description="one BatchNorm per width (statistics and "
                                "affine); false shares them")
    ignore: list[str] = Field(default_factory=list, description="module names left in float")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("bits needs at least one width, e.g. [8, 4, 2]")
        bad = [b for b in v if not 1 <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"bits {bad} out of range: each width must be 1..{MAX_BITS} (the "
                             f"weights are stored as {MAX_BITS}-bit codes)")
        if len(set(v)) != len(v):
            raise ValueError(f"bits {v} lists a width twice")
        return sorted(v, reverse=True)


@register_module_type
class AnyPrecisionModel(nn.Module):
    """``backbone`` with nested layers, run at ``active`` bits (one of ``bits``)."""

    structure_fixed_by = "dynamic.any_precision"  # lighten.graph: no channel surgery after it

    def __init__(self, backbone: nn.Module, bits: list[int], *, active: int | None = None,
                 backbone_spec: dict | None = None, input_shape=None, num_classes=None,
                 task: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.bits = [int(b) for b in bits]
        self.active = self.bits[0] if active is None else int(active)
        self.backbone_spec = backbone_spec
        self.input_shape = None if input_shape is None else [int(d) for d in input_shape]
        self.num_classes = None if num_classes is None else int(num_classes)
        self.task = task

    # ------------------------------------------------------------------ choosing a precision

    @property
    def precisions(self) -> list[int]:
        return list(self.bits)

    def set_precision(self, bits: int) -> AnyPrecisionModel:
        """Run at ``bits`` from now on (and save so); returns the model."""
        self.active = check_bits(bits, self.bits)
        self._propagate()
        return self

    def _propagate(self) -> None:
        for m in self.backbone.modules():
            if is_switchable(m):
                m.active = self.active

    def forward(self, *inputs):
        self._propagate()
        return self.backbone(*inputs)

    def plain(self, bits: int | None = None) -> nn.Module:
        """The ``bits``-bit sub-model as standard layers (weights dequantized from its codes,
        its own BatchNorms): what the ONNX export of that precision is."""
        bits = self.active if bits is None else check_bits(bits, self.bits)
        out = copy.deepcopy(self.backbone)
        swaps = [(n, m) for n, m in out.named_modules() if hasattr(m, "to_float")
                 and is_switchable(m)]
        for name, m in swaps:
            out.set_submodule(name, m.to_float(bits))
        return out.eval()

    def nested_layers(self) -> dict[str, _NestedStorage]:
        return {n: m for n, m in self.backbone.named_modules() if isinstance(m, _NestedStorage)}

    # ------------------------------------------------------------------ artifact, export

    def artifact_config(self) -> dict[str, Any]:
        if self.backbone_spec is None:
            raise CheckpointError("cannot save an AnyPrecisionModel whose backbone_spec is "
                                  "unknown: set model.backbone_spec (e.g. {'zoo': 'resnet20'}) "
                                  "or pass model_spec= to save_artifact")
        return {"backbone_spec": self.backbone_spec, "bits": self.bits, "active": self.active,
                "input_shape": self.input_shape, "num_classes": self.num_classes,
                "task": self.task}

    @classmethod
    def from_artifact(cls, config: dict) -> AnyPrecisionModel:
        from lighten.trust import build_recorded_backbone

        backbone = build_recorded_backbone(config, "AnyPrecisionModel's backbone")
        return cls(backbone, config["bits"], active=config.get("active"),
                   backbone_spec=config["backbone_spec"], input_shape=config["input_shape"],
                   num_classes=config["num_classes"], task=config.get("task"))

    def onnx_graph(self, specs, *, opset: int = 17):
        """The active precision's plain model (:meth:`plain`), traced."""
        return export_plain(self.plain(), specs, opset=opset)

    def dynamic_measure(self, dataset, **kwargs) -> dict[str, Any]:
        return measure_precisions(self, dataset, **kwargs)


def check_bits(bits, trained: list[int]) -> int:
    """``bits`` as an int when it is one of ``trained``; one clear error otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise UnsupportedError(f"bits must be an integer, one of {trained}; got {bits!r}")
    bits = int(bits)
    if bits not in trained:
        extra = (f" (weights are stored as {MAX_BITS}-bit codes at most)" if bits > MAX_BITS
                 else "")
        raise UnsupportedError(f"bits={bits} is not one of this model's trained precisions "
                               f"{trained}{extra}; choose one of them, or train it with "
                               f"dynamic.any_precision bits: [...]")
    return bits


def select_precision(model: nn.Module, bits: int) -> AnyPrecisionModel:
    """``model`` (an any-precision model) set to run at ``bits``; ModelError for other models."""
    if not isinstance(model, AnyPrecisionModel):
        raise ModelError(f"a precision (bits={bits}) can only be chosen for a model made by "
                         f"dynamic.any_precision; this is a {type(model).__name__} (drop --bits/"
                         f"bits=, or quantize it with quant.ptq / quant.weight_only)")
    return model.set_precision(bits)


def export_plain(model: nn.Module, specs, *, opset: int = 17):
    """Trace a plain model to an ONNX ModelProto (batch axis dynamic)."""
    import onnx

    from lighten.export import OUTPUT_NAME, _names

    names = _names(specs)
    example = tuple(torch.zeros(1, *s.shape, dtype=s.dtype) for s in specs)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, buf, input_names=names,
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={**{n: {0: "batch"} for n in names},
                                        OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


# --------------------------------------------------------------------------- the step


def nest_layers(model: nn.Module, bits: list[int], *, ignore=(), switchable_bn: bool = True,
                notes: list[str] | None = None) -> list[str]:
    """Swap every nestable Conv / Linear of ``model`` (not in ``ignore``, not read directly by
    its parent) for a :class:`NestedTrainer` and, with ``switchable_bn``, every BatchNorm for
    a :class:`PrecisionBatchNorm`, in place; returns the nested layers' names."""
    from lighten.quant.eligibility import swappable, unfuse_stock_blocks

    notes = notes if notes is not None else []
    unfuse_stock_blocks(model, notes, ignore)

    def ignored(name: str) -> bool:
        return any(name == n or name.startswith(n + ".") for n in ignore)

    names = swappable(model, [n for n, m in model.named_modules()
                              if nestable(m) and not ignored(n)], notes)
    for name in names:
        model.set_submodule(name, NestedTrainer(model.get_submodule(name), bits))
    if switchable_bn and len(bits) > 1:
        for name, m in list(model.named_modules()):
            if bn_dims(m) is not None and not ignored(name):
                model.set_submodule(name, PrecisionBatchNorm.from_bn(m, bits))
    return names


def precision_loss_term(ap: AnyPrecisionModel, task, *, distill: float = 0.0,
                        temperature: float = 1.0):
    """LossTerm: the task loss of every narrower width on the same batch (the shared loop
    already computed the widest), plus ``distill`` x the soft-target loss against it."""

    def term(model, x, outputs: Tensor, y: Tensor) -> Tensor:
        total = outputs.new_zeros(())
        if not ap.training:
            return total
        top, inputs = ap.active, x if isinstance(x, tuple) else (x,)
        try:
            for b in ap.bits:
                if b == top:
                    continue
                ap.active = b
                out = ap(*inputs)
                total = total + task.loss(out, y)
                if distill:
                    t = temperature
                    soft = F.kl_div(F.log_softmax(out / t, -1),
                                    F.softmax(outputs.detach() / t, -1), reduction="batchmean")
                    total = total + distill * t * t * soft
        finally:
            ap.active = top
            ap._propagate()
        return total

    return term


@torch.no_grad()
def make_permanent(ap: AnyPrecisionModel) -> AnyPrecisionModel:
    """Every :class:`NestedTrainer` becomes its storage layer (codes + scales)."""
    for name, m in list(ap.backbone.named_modules()):
        if isinstance(m, NestedTrainer):
            ap.backbone.set_submodule(name, m.to_storage())
    return ap.set_precision(ap.bits[0])


@register_step("dynamic.any_precision", AnyPrecisionConfig, quantizes=True,
               needs_data=lambda c: "labelled training data (all precisions trained at once)")
def any_precision(model: nn.Module, cfg: AnyPrecisionConfig, ctx: StepContext) -> nn.Module:
    """One set of nested int8 weights that runs at every precision of ``bits``."""
    from lighten.dynamic.early_exit import zoo_spec
    from lighten.modules import require_modules
    from lighten.quant.quantizer import sqnr_db

    dynamic = [type(m).__name__ for m in model.modules() if hasattr(m, "dynamic_measure")]
    if dynamic:
        raise UnsupportedError(f"dynamic.any_precision cannot wrap a {dynamic[0]}: a dynamic "
                               "step comes last, once")
    require_modules(model, cfg.ignore, key="dynamic.any_precision ignore")
    spec = getattr(ctx, "model_spec", None) or zoo_spec(model, ctx)
    notes: list[str] = []
    names = nest_layers(model, cfg.bits, ignore=cfg.ignore, switchable_bn=cfg.switchable_bn,
                        notes=notes)
    floats = {n: model.get_submodule(n).layer.weight.detach().clone() for n in names}
    had_zeros = any(bool((w == 0).any()) for w in floats.values())
    for message in notes:
        ctx.note(message)
    if not names:
        raise UnsupportedError("dynamic.any_precision: the model has no Conv1d/2d/3d (zero "
                               "padding) or Linear layer to quantize")
    ap = AnyPrecisionModel(model, cfg.bits, backbone_spec=spec, input_shape=list(ctx.input_shape),
                           num_classes=getattr(ctx.task, "num_classes", None),
                           task=ctx.task.describe())
    finetune = cfg.finetune if cfg.finetune is not None else FinetuneConfig(epochs=3)
    term = precision_loss_term(ap, ctx.task, distill=cfg.distill, temperature=cfg.temperature)
    ctx.finetune(ap, finetune, loss_terms=[term])
    make_permanent(ap)
    sqnr = {b: [] for b in cfg.bits}
    for name, layer in ap.nested_layers().items():
        row = {f"sqnr_db_w{b}": sqnr_db(floats[name], layer.weight_at(b)) for b in cfg.bits}
        for b in cfg.bits:
            sqnr[b].append(row[f"sqnr_db_w{b}"])
        ctx.layer(f"backbone.{name}", "nested quantize", before="float",
                  after=f"int{cfg.bits[0]} codes; " + ", ".join(f"w{b}" for b in cfg.bits),
                  **row)
    if had_zeros:
        ctx.note("dynamic.any_precision: the nested grid has no zero level ((c + 0.5) * s), so "
                 "exact zeros (pruned weights) become +-scale/2")
    ctx.summary.update(dynamic={
        "bits": cfg.bits, "stored_bits": cfg.bits[0], "layers": len(names),
        "weight_sqnr_db": {str(b): float(np.mean(v)) for b, v in sqnr.items()},
        "switchable_bn": cfg.switchable_bn})
    ctx.note(f"dynamic.any_precision: {len(names)} layers store int{cfg.bits[0]} codes serving "
             f"{'/'.join(map(str, cfg.bits))}-bit weights (top bits); trained "
             f"{finetune.epochs:g} epochs at every width; mean weight SQNR "
             + ", ".join(f"w{b} {np.mean(v):.1f} dB" for b, v in sqnr.items()))
    return ap


# --------------------------------------------------------------------------- measuring


def measure_precisions(ap: AnyPrecisionModel, dataset, *, task=None, threads=None,
                       compiled=None, workdir=None, **_) -> dict[str, Any]:
    """The stage row's per-precision breakdown: per width, test accuracy of its deployed ONNX
    model (the active one is ``compiled``), top-1 agreement with the widest width, and the
    weight bytes a build of that width alone would store."""
    from lighten.dynamic.runtime import _session_fn
    from lighten.task import ClassificationTask

    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=512):
        xs.append(task.as_inputs(x) if task is not None else (x,))
        ys.append(torch.as_tensor(y))
    if task is None:
        task = ClassificationTask(tuple(xs[0][0].shape[1:]), int(ap.num_classes or 0))
    if len(xs[0]) != 1:  # plain ONNX export below feeds one float input
        return {}
    targets = torch.cat(ys)
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(
        prefix="lighten-any-precision-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows, reference = [], None
    for b in ap.bits:
        if b == ap.active and compiled is not None:
            run = compiled
        else:
            import onnx

            path = folder / f"w{b}.onnx"
            onnx.save(export_plain(ap.plain(b), task.inputs), str(path))
            run = _session_fn(path, threads)
        outputs = torch.cat([torch.from_numpy(np.asarray(run(x[0].numpy()), dtype=np.float32))
                             for x in xs])
        metrics = task.metrics(outputs, targets)
        reference = task.reference(outputs) if reference is None else reference
        rows.append({"bits": b, "accuracy": metrics.get("accuracy"),
                     "agreement_with_widest": task.agreement(outputs, reference),
                     "weight_bytes": weight_bytes(ap, b)})
    return {"dynamic": {
        "kind": "any_precision", "form": "one plain ONNX model per precision (model.onnx: the "
        f"active {ap.active}-bit one); one artifact of int{ap.bits[0]} codes",
        "active_bits": ap.active, "stored_bits": ap.bits[0], "precisions": rows}}


def weight_bytes(ap: AnyPrecisionModel, bits: int) -> int:
    """Bytes of the nested layers' ``bits``-bit codes (packed) and that width's scales."""
    total = 0
    for layer in ap.nested_layers().values():
        total += -(-layer.codes.numel() * bits // 8) + layer.scales.shape[1] * 4
    return total


__all__ = ["AnyPrecisionConfig", "AnyPrecisionModel", "any_precision", "check_bits",
           "make_permanent", "measure_precisions", "nest_layers", "precision_loss_term",
           "select_precision"]
