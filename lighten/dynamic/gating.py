"""``dynamic.gating``: learned per-input gates that skip residual blocks (SkipNet, Wang et al.
2018; ConvNet-AIG, Veit & Belongie 2018), trained with a compute-budget loss.

A block can be skipped when it maps features to features of the same shape (a residual block
whose shortcut is the identity): skipping it passes its input on. Each such block of the
backbone's module chain (:func:`~lighten.dynamic.exits.module_chain`) gets a gate (global
average pool + Linear -> one logit) that reads the block's input. Training samples hard
decisions with a straight-through Gumbel-sigmoid, and the loss adds ``budget_weight x
(expected MAC ratio - target_macs)^2`` (or per gate, the default: see ``budget``), plus
distillation from the ungated model. After training one logit threshold, shared by the gates
(a buffer with one entry per gate), is calibrated on held-out training data: the cheapest whose
accuracy drop against the model before gating, plus ``margin`` standard errors, stays within
``max_drop`` (as ``dynamic.early_exit`` calibrates its exits), or with ``max_drop: null`` the
one whose mean executed MACs meet ``target_macs``.

Inference: batch 1 runs a block only when its gate opens; a batch (and the export) computes the
block and selects per sample. Deployed as one ONNX graph with an ``If`` per gate (then: the
block, selected per row; else: the input passed on), so a closed gate runs none of the block's
nodes (:func:`gated_graph`).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lighten.errors import CheckpointError, UnsupportedError
from lighten.modules import register_module_type
from lighten.registry import register_step
from lighten.step import FinetuneConfig, StepConfig, StepContext


class GatingFinetuneConfig(FinetuneConfig):
    """``finetune:`` of ``dynamic.gating``: the backbone learns to do without skipped blocks,
    more than a touch-up, hence 0.3x the train lr by default."""

    lr_scale: float = Field(0.3, gt=0, description="without lr: the fine-tune lr is this "
                            "multiple of the recipe's train lr (dynamic.gating: 0.3)")


class GatingConfig(StepConfig):
    """``dynamic.gating``: the mean executed MACs to train for, and how the threshold is set:
    to ``target_macs`` when only it is given, else the cheapest within ``max_drop``.

    ResNet-20 / Fashion-MNIST (5 epochs): at target_macs 0.7 the test set lost 0.45 points at
    0.70x the MACs; max_drop 0.5 with the 1.5-SE margin kept 0.93x at +0.05 (the held-out
    estimate of the drop at 0.7x was 0.47 points, its bound 0.76)."""

    target_macs: float = Field(0.7, gt=0, le=1, description="mean executed MACs per sample as "
                               "a fraction of the model's: what the gates are trained to; with "
                               "max_drop: null also what the threshold is calibrated to")
    max_drop: float | None = Field(0.5, ge=0, description="accuracy points the gates may lose "
                                   "on held-out data against the model before gating; the "
                                   "threshold is the cheapest within it (null: calibrate to "
                                   "target_macs)")
    margin: float = Field(1.5, ge=0, description="max_drop must hold for the held-out drop plus "
                          "this many standard errors of it")
    budget: Literal["per_gate", "total"] = Field(
        "per_gate", description="per_gate: every gate's open rate is pushed to the rate that "
        "meets target_macs (ConvNet-AIG), so no gate can meet it by closing its block for every "
        "input; total: only the mean MAC ratio is pushed")
    budget_weight: float = Field(4.0, ge=0, description="weight of the squared budget gap")
    distill: float = Field(1.0, ge=0, description="weight of a soft-target loss from the "
                           "ungated model (what skipping must not change)")
    temperature: float = Field(1.0, gt=0, description="Gumbel-sigmoid temperature")
    gate_epochs: float = Field(0.5, ge=0, description="gates-only epochs (backbone frozen) "
                               "before the joint finetune:")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="share of the training data held out "
                           "to calibrate the gate threshold")
    ignore: list[str] = Field(default_factory=list, description="blocks that always run")
    finetune: GatingFinetuneConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _calibration_target(cls, data):
        """``target_macs`` given without ``max_drop`` is the cost the user asks for: the
        threshold meets it (``{target_macs: 0.7}`` runs at 0.7x); neither given: max_drop 0.5."""
        if isinstance(data, dict) and "target_macs" in data and "max_drop" not in data:
            data = {**data, "max_drop": None}
        return data


def _gate(shape) -> nn.Sequential:
    """Global pool + Linear -> one logit; starts open (bias 3) so training starts from the
    unchanged model."""
    linear = nn.Linear(shape[0], 1)
    nn.init.zeros_(linear.weight)
    nn.init.constant_(linear.bias, 3.0)
    if len(shape) == 1:
        return nn.Sequential(linear)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)


@register_module_type
class GatedModel(nn.Module):
    """``backbone`` run as its module chain; ``chain[gated[i]]`` runs only where ``gates[i]``
    (its input -> a logit) exceeds ``threshold[i]`` (a buffer)."""

    structure_fixed_by = "dynamic.gating"  # lighten.graph: no channel surgery after it

    artifact_type = "lighten.dynamic:GatedModel"

    def __init__(self, backbone: nn.Module, chain: list[str], gated: list[int],
                 gates: list[nn.Module] | nn.ModuleList, *, backbone_spec: dict | None = None,
                 input_shape=None, num_classes=None, task: dict | None = None,
                 block_macs: list[int] | None = None, total_macs: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.gates = gates if isinstance(gates, nn.ModuleList) else nn.ModuleList(gates)
        self.chain = [str(p) for p in chain]
        self.gated = [int(i) for i in gated]
        self.register_buffer("threshold", torch.zeros(len(self.gated)))
        self.backbone_spec = backbone_spec
        self.input_shape = None if input_shape is None else [int(d) for d in input_shape]
        self.num_classes = None if num_classes is None else int(num_classes)
        self.task = task
        self.block_macs = block_macs  # MACs of each gated block
        self.total_macs = total_macs  # the whole backbone
        self.temperature = 1.0
        self.gate_open: list[Tensor] = []  # training: per gate, the (B,) decisions (ST)
        self._executed: list[bool] = []

    def artifact_config(self) -> dict[str, Any]:
        if self.backbone_spec is None:
            raise CheckpointError("cannot save a GatedModel whose backbone_spec is unknown: set "
                                  "model.backbone_spec (e.g. {'zoo': 'resnet20'}) before saving, "
                                  "or run dynamic.gating from a recipe")
        return {"backbone_spec": self.backbone_spec, "input_shape": self.input_shape,
                "num_classes": self.num_classes, "task": self.task, "chain": self.chain,
                "gated": self.gated, "block_macs": self.block_macs,
                "total_macs": self.total_macs}

    @classmethod
    def from_artifact(cls, config: dict) -> GatedModel:
        from lighten.trust import build_recorded_backbone

        backbone = build_recorded_backbone(config, "GatedModel's backbone")
        return cls(backbone, config["chain"], config["gated"], [],
                   backbone_spec=config["backbone_spec"], input_shape=config["input_shape"],
                   num_classes=config["num_classes"], task=config.get("task"),
                   block_macs=config.get("block_macs"), total_macs=config.get("total_macs"))

    def train(self, mode: bool = True):
        super().train(mode)
        self.gate_open = []
        return self

    def forward(self, x: Tensor) -> Tensor:
        where = {pos: i for i, pos in enumerate(self.gated)}
        batch1 = (not self.training and x.shape[0] == 1
                  and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()))
        self._executed = []
        self.gate_open = []
        for pos, path in enumerate(self.chain):
            module = self.backbone.get_submodule(path)
            i = where.get(pos)
            if i is None:
                x = module(x)
                continue
            logit = self.gates[i](x).reshape(-1)  # (B,)
            if self.training:
                u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
                soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.temperature)
                hard = (soft > 0.5).to(soft.dtype)
                g = hard + soft - soft.detach()  # straight-through: hard forward, soft gradient
                self.gate_open.append(g)
                x = _select(g, module(x), x)
            elif batch1:
                run = bool(logit[0] > self.threshold[i])
                self._executed.append(run)
                if run:
                    x = module(x)
            else:
                x = torch.where(_expand(logit > self.threshold[i], x), module(x), x)
        return x

    def decisions(self, x: Tensor) -> Tensor:
        """(B, gates) booleans: which blocks each sample runs (eval)."""
        return self.run_gated(x)[1]

    def run_gated(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(outputs, (B, gates) decisions) in eval mode, each block computed only for the rows
        whose gate opens (the same result as the batch forward, at the executed cost)."""
        opened = []
        was = self.training
        self.eval()
        with torch.no_grad():
            where = {pos: i for i, pos in enumerate(self.gated)}
            for pos, path in enumerate(self.chain):
                module = self.backbone.get_submodule(path)
                i = where.get(pos)
                if i is None:
                    x = module(x)
                    continue
                take = self.gates[i](x).reshape(-1) > self.threshold[i]
                opened.append(take)
                if bool(take.all()):
                    x = module(x)
                elif bool(take.any()):
                    x = x.clone()
                    x[take] = module(x[take])
        self.train(was)
        return x, torch.stack(opened, 1)

    def gate_logits(self, x: Tensor) -> Tensor:
        """(B, gates) logits with every block run (for the threshold search)."""
        out = []
        with torch.no_grad():
            where = {pos: i for i, pos in enumerate(self.gated)}
            for pos, path in enumerate(self.chain):
                if pos in where:
                    out.append(self.gates[where[pos]](x).reshape(-1))
                x = self.backbone.get_submodule(path)(x)
        return torch.stack(out, 1)

    def executed_macs(self, opened: Tensor) -> np.ndarray:
        """Per sample, the MACs it executes given its gate decisions (gates included)."""
        skipped = (~opened).float().numpy() @ np.asarray(self.block_macs, dtype=np.float64)
        return self.total_macs - skipped

    def onnx_graph(self, specs, *, opset: int = 17):
        """The deployed graph: one ``If`` per gate (:func:`gated_graph`)."""
        if len(specs) != 1 or not specs[0].is_float:
            raise UnsupportedError("a gated model exports for one float input")
        return gated_graph(self, torch.zeros(1, *specs[0].shape), opset=opset)

    def dynamic_measure(self, dataset, **kwargs) -> dict[str, Any]:
        return measure_gated(self, dataset, **kwargs)


def _expand(take: Tensor, like: Tensor) -> Tensor:
    return take.reshape(-1, *([1] * (like.dim() - 1)))


def _select(g: Tensor, run: Tensor, skip: Tensor) -> Tensor:
    g = _expand(g, run)
    return g * run + (1 - g) * skip


def budget_term(weight: float, target: float, *, per_gate: bool = True):
    """The compute-budget loss from the straight-through gates: ``weight x (executed MAC ratio
    - target)^2`` (``per_gate=False``), or ``weight x`` the mean over gates of ``(open rate -
    r)^2`` with ``r`` the one open rate that meets ``target``."""

    def term(model: nn.Module, x, outputs: Tensor, y: Tensor) -> Tensor:
        if not model.gate_open:
            return outputs.new_zeros(())
        opened = torch.stack(model.gate_open, 1)  # (B, gates)
        if per_gate:
            rate = open_rate(model.block_macs, model.total_macs, target)
            return weight * ((opened.mean(0) - rate) ** 2).mean()
        macs = torch.tensor(model.block_macs, dtype=opened.dtype)
        skipped = ((1 - opened) * macs).sum(1).mean()
        ratio = (model.total_macs - skipped) / model.total_macs
        return weight * (ratio - target) ** 2

    return term


def open_rate(block_macs: list[int], total_macs: int, target: float) -> float:
    """The open rate shared by all gates at which the mean executed MACs are ``target`` of the
    model's."""
    return 1.0 - (1.0 - target) * total_macs / max(sum(block_macs), 1)


def distill_term(teacher: nn.Module, weight: float, temperature: float = 2.0):
    """Soft targets from the ungated model: the gated one should answer as it did."""
    from lighten.distill import soft_target_loss

    def term(model: nn.Module, x, outputs: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            target = teacher(x)
        return weight * soft_target_loss(outputs, target, temperature)

    return term


@register_step("dynamic.gating", GatingConfig,
               needs_data=lambda c: "labelled training data (gates, held-out threshold)")
def gating(model: nn.Module, cfg: GatingConfig, ctx: StepContext) -> nn.Module:
    """Learned gates skip residual blocks per input, trained to a mean-MACs budget."""
    from lighten.dynamic.early_exit import _split, chain_profile, zoo_spec
    from lighten.dynamic.exits import module_chain
    from lighten.measure.macs import count_macs

    if isinstance(model, GatedModel):
        raise UnsupportedError("dynamic.gating: the model has gates already; apply it once")
    chain = module_chain(model, step="dynamic.gating")
    x = ctx.example_input(1)
    shapes, macs = chain_profile(model, chain, x)
    inputs = [tuple(x.shape[1:]), *shapes[:-1]]
    from lighten.modules import require_modules

    require_modules(model, cfg.ignore, key="dynamic.gating ignore")
    gated = [i for i in range(len(chain)) if inputs[i] == shapes[i] and len(shapes[i]) in (1, 3)
             and macs[i] - (macs[i - 1] if i else 0) > 0 and chain[i] not in cfg.ignore]
    if not gated:
        raise UnsupportedError("dynamic.gating: no block of the model keeps its input's shape "
                               "(a residual block with an identity shortcut); nothing to skip")
    gates = [_gate(inputs[i]) for i in gated]
    gate_macs = sum(count_macs(g, torch.zeros(1, *inputs[i])) for g, i in zip(gates, gated,
                                                                              strict=True))
    block = [int(macs[i] - (macs[i - 1] if i else 0)) for i in gated]
    spec = getattr(ctx, "model_spec", None) or zoo_spec(model, ctx)
    gm = GatedModel(model, chain, gated, gates, backbone_spec=spec,
                    input_shape=list(ctx.input_shape), num_classes=ctx.task.num_classes,
                    task=ctx.task.describe(), block_macs=block, total_macs=int(macs[-1] +
                                                                               gate_macs))
    if open_rate(block, gm.total_macs, cfg.target_macs) < 0:
        least = (gm.total_macs - sum(block)) / macs[-1]
        raise UnsupportedError(f"dynamic.gating: target_macs {cfg.target_macs} is below what "
                               f"skipping every gated block gives ({least:.2f}); raise it")
    gm.temperature = cfg.temperature
    fit_ctx, held = _split(ctx, cfg.holdout)
    if cfg.max_drop is not None and ctx.task.kind != "classification":
        raise UnsupportedError(f"dynamic.gating: max_drop needs a classification task, not "
                               f"{ctx.task.kind}; set max_drop: null to calibrate the threshold "
                               "to target_macs")
    x_held, y_held = _tensors(held)
    with torch.no_grad():  # the reference max_drop is measured against: the model before gating
        reference = _correct(model.eval(), x_held, y_held)
    terms = [budget_term(cfg.budget_weight, cfg.target_macs, per_gate=cfg.budget == "per_gate")]
    if cfg.distill:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        terms.append(distill_term(teacher, cfg.distill))
    for p in gm.backbone.parameters():
        p.requires_grad_(False)
    fit_ctx.finetune(gm, FinetuneConfig(epochs=cfg.gate_epochs, lr_scale=1.0), loss_terms=terms)
    for p in gm.backbone.parameters():
        p.requires_grad_(True)
    fit_ctx.finetune(gm, cfg.finetune or GatingFinetuneConfig(epochs=1), loss_terms=terms)
    gm.eval()
    cal = calibrate_threshold(gm, x_held, y_held, base_macs=macs[-1], reference=reference,
                              target_macs=None if cfg.max_drop is not None else cfg.target_macs,
                              max_drop=cfg.max_drop, margin=cfg.margin)
    for i, (pos, b) in enumerate(zip(gated, block, strict=True)):
        ctx.layer(f"gates.{i}", "add gate", before="-",
                  after=f"{chain[pos]} runs where this gate opens", block=chain[pos], macs=b)
    ratio, acc = cal["macs_ratio"], cal["accuracy"]
    macs_met = ratio <= cfg.target_macs + 1e-9
    ctx.summary.update(dynamic={"gated_blocks": [chain[i] for i in gated],
                                "thresholds": gm.threshold.tolist(),
                                "held_out_samples": len(held),
                                "held_out_macs_ratio": ratio, "held_out_accuracy": acc,
                                "held_out_reference_accuracy": cal["reference_accuracy"],
                                "held_out_drop": cal["drop"], "max_drop": cfg.max_drop,
                                "margin": cfg.margin, "target_macs_met": macs_met,
                                "target_met": cal["met"], "curve": cal["curve"]})
    goal = (f"max_drop {cfg.max_drop} (+{cfg.margin} SE)" if cfg.max_drop is not None
            else f"target_macs {cfg.target_macs}")
    ctx.note(f"dynamic.gating: {len(gated)} gated blocks; on {len(held)} held-out training "
             f"samples {ratio:.2f}x the MACs at {acc:.2%} accuracy ({cal['drop']:+.2f} points "
             f"lost against {cal['reference_accuracy']:.2%}; {goal}"
             f"{'' if cal['met'] else ': NOT met'}; target_macs {cfg.target_macs} "
             f"{'reached' if macs_met else 'not reached'})")
    return gm


def _tensors(dataset) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*[(x, torch.as_tensor(y)) for x, y in DataLoader(dataset, batch_size=512)],
                 strict=True)
    return torch.cat(xs), torch.cat(ys)


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    out = torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)])
    return (out.argmax(-1) == y).numpy()


def calibrate_threshold(gm: GatedModel, x: Tensor, y: Tensor, *, base_macs: float,
                        reference: np.ndarray, max_drop: float | None = None,
                        target_macs: float | None = None, margin: float = 0.0,
                        steps: int = 12, curve_points: int = 4) -> dict[str, Any]:
    """Set the logit threshold shared by all gates on held-out data (``x``, ``y``; never the
    test set) and return what it gives there.

    ``max_drop``: the highest threshold (fewest blocks run) whose accuracy drop against
    ``reference`` (per sample: the model before gating was right), plus ``margin`` standard
    errors of the paired per-sample difference, stays within ``max_drop`` points: of every
    threshold tried, the cheapest that meets it (the drop need not be monotone), else every
    gate open. ``target_macs``: the lowest threshold whose mean executed MACs are within it.
    Gates apply in sequence (a skipped block changes what later gates read), so each candidate
    is a run of the gated model; a bisection over the range of the gates' logits needs ~12,
    and ``curve_points`` thresholds at quantiles of the logits sketch the trade-off.
    Per-gate thresholds (each gate's logit quantile at the budget's open rate, plus a shared
    offset) were measured worse on ResNet-20 / Fashion-MNIST after a short training (48.9%
    against 78.9% at 0.65x): they open every block for a share of the inputs, and the network
    had not learnt to do without its last blocks for any input."""
    if (max_drop is None) == (target_macs is None):
        raise UnsupportedError("calibrate_threshold: give max_drop or target_macs, not both")
    reference = np.asarray(reference, dtype=np.float64)
    n = len(reference)
    tried: dict[float, dict[str, Any]] = {}

    def at(t: float) -> dict[str, Any]:
        if t not in tried:
            gm.threshold.fill_(t)
            runs = [gm.run_gated(x[i:i + 1024]) for i in range(0, len(x), 1024)]
            out, opened = (torch.cat(r) for r in zip(*runs, strict=True))
            right = (out.argmax(-1) == y).numpy().astype(np.float64)
            diff = reference - right  # paired: > 0 where gating lost the sample
            drop = float(diff.mean() * 100)
            bound = drop + margin * float(diff.std() / np.sqrt(n) * 100)
            ratio = float(gm.executed_macs(opened).mean() / base_macs)
            tried[t] = {"threshold": t, "macs_ratio": ratio, "accuracy": float(right.mean()),
                        "drop": drop, "drop_bound": bound,
                        "met": bound <= max_drop + 1e-9 if max_drop is not None
                        else ratio <= target_macs + 1e-9}
        return tried[t]

    logits = torch.cat([gm.gate_logits(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    lo, hi = float(logits.min()) - 1.0, float(logits.max()) + 1.0  # every gate open / closed
    for q in np.linspace(0.1, 0.7, curve_points):  # the trade-off, for the report (and a
        at(float(np.quantile(logits.numpy(), q)))  # met point the bisection may step over)
    if max_drop is not None:
        if at(hi)["met"]:
            lo = hi
        elif at(lo)["met"]:
            for _ in range(steps):  # the boundary between within max_drop (lo) and not (hi)
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if at(mid)["met"] else (lo, mid)
        met = [r for r in tried.values() if r["met"]]
        best = min(met, key=lambda r: r["macs_ratio"]) if met else at(lo)
    else:
        if at(0.0)["met"]:
            hi = 0.0
        else:
            for _ in range(steps + 10):  # a higher threshold closes more gates
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if at(mid)["met"] else (mid, hi)
        best = at(hi)
    gm.threshold.fill_(best["threshold"])
    curve = sorted(({k: r[k] for k in ("threshold", "macs_ratio", "drop", "drop_bound")}
                    for r in tried.values()), key=lambda r: -r["threshold"])
    return {**best, "reference_accuracy": float(reference.mean()), "curve": curve}


# --------------------------------------------------------------------------- deployment


def gated_graph(gm: GatedModel, example: Tensor, *, opset: int = 17):
    """One ONNX graph: plain runs of modules inline; per gated block the gate inline, then
    ``If(max logit > t)`` (any row opens) -> the block, rows selected by their gate (``Where``);
    else the input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lighten.dynamic.onnx_if import _renamed

    gm = copy.deepcopy(gm).eval()
    nodes, inits = [], []
    current, h = "input", example[:1]
    where = {pos: i for i, pos in enumerate(gm.gated)}
    pending: list[nn.Module] = []
    with tempfile.TemporaryDirectory() as tmp:

        def inline(module: nn.Module, tag: str, x: Tensor, value: str):
            # the tag names graph nodes ("c0/gate"); the file name must not hold its slashes
            proto = _export(module, x, Path(tmp) / f"{tag.replace('/', '_')}.onnx", opset)
            n, i, outs = _renamed(proto.graph, f"{tag}/", value)
            return n, i, outs[0]

        def flush(value: str, x: Tensor, tag: str):
            if not pending:
                return value, x
            seq = nn.Sequential(*pending)
            n, i, out = inline(seq, tag, x, value)
            nodes.extend(n)
            inits.extend(i)
            with torch.no_grad():
                x = seq(x)
            pending.clear()
            return out, x

        for pos, path in enumerate(gm.chain):
            module = gm.backbone.get_submodule(path)
            k = where.get(pos)
            if k is None:
                pending.append(module)
                continue
            current, h = flush(current, h, f"p{pos}")
            p = f"c{k}/"
            raw, to_logit = _gate_nodes(gm.gates[k], h, current, p, nodes, inits, inline)
            bn, bi, bout = inline(module, f"b{k}", h, current)
            inits.append(numpy_helper.from_array(np.array(float(gm.threshold[k]), np.float32),
                                                 p + "t"))
            # If(max over rows of the logit > t): ReduceMax + Greater, no casts (fewer nodes at
            # batch 1, where each node's dispatch costs about as much as a small conv)
            nodes += [helper.make_node("ReduceMax", [raw], [p + "max"], keepdims=0),
                      helper.make_node("Greater", [p + "max", p + "t"], [p + "any"])]
            then_nodes = [*bn, *to_logit,
                          helper.make_node("Greater", [p + "logit", p + "t"], [p + "take"]),
                          helper.make_node("Where", [p + "take", bout, current], [p + "then"])]
            out_info = helper.make_tensor_value_info(p + "then", TensorProto.FLOAT, None)
            else_info = helper.make_tensor_value_info(p + "else", TensorProto.FLOAT, None)
            then_graph = helper.make_graph(then_nodes, f"then{k}", [], [out_info],
                                           initializer=bi)
            else_graph = helper.make_graph([helper.make_node("Identity", [current],
                                                             [p + "else"])],
                                           f"else{k}", [], [else_info])
            nodes.append(helper.make_node("If", [p + "any"], [p + "out"],
                                          then_branch=then_graph, else_branch=else_graph))
            current = p + "out"
            with torch.no_grad():
                h = module(h)
        current, h = flush(current, h, "tail")
        nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(
        nodes, "gated", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                       ["batch", *example.shape[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", h.shape[-1]])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lighten.dynamic")
    onnx.checker.check_model(model)
    return model


def _gate_nodes(gate: nn.Module, h: Tensor, value: str, p: str, nodes: list, inits: list,
                inline) -> tuple[str, list]:
    """Append the nodes of ``gate`` reading ``value`` (shaped like ``h``); returns the name of
    its logit and the branch nodes that make it ``p + "logit"`` shaped (B, 1, ..., 1) (rank of
    ``h``), which broadcasts against the block's output. The default gate (pool, flatten,
    linear) on a feature map is written as GlobalAveragePool + a 1x1 Conv: two nodes instead
    of four plus the reshape.

    The reshape goes inside the If branch: ORT's QDQ propagation (1.32) aborts the process on
    a DequantizeLinear -> Reshape whose output an If subgraph reads from the outer graph (a
    quantized gate)."""
    from onnx import helper, numpy_helper

    layers = list(gate) if isinstance(gate, nn.Sequential) else []
    if (h.dim() == 4 and len(layers) == 3 and isinstance(layers[0], nn.AdaptiveAvgPool2d)
            and layers[0].output_size in (1, (1, 1)) and isinstance(layers[1], nn.Flatten)
            and isinstance(layers[2], nn.Linear) and layers[2].out_features == 1):
        linear = layers[2]
        w = linear.weight.detach().float().numpy().reshape(1, -1, 1, 1)
        b = (linear.bias.detach().float().numpy() if linear.bias is not None
             else np.zeros(1, np.float32))
        inits += [numpy_helper.from_array(w, p + "gate_w"),
                  numpy_helper.from_array(b, p + "gate_b")]
        nodes += [helper.make_node("GlobalAveragePool", [value], [p + "pooled"]),
                  helper.make_node("Conv", [p + "pooled", p + "gate_w", p + "gate_b"],
                                   [p + "logit"])]
        return p + "logit", []
    n, i, logit = inline(gate, p + "gate", h, value)
    nodes.extend(n)
    inits.extend(i)
    inits.append(numpy_helper.from_array(np.array([-1] + [1] * (h.dim() - 1), np.int64),
                                         p + "shape"))
    return logit, [helper.make_node("Reshape", [logit, p + "shape"], [p + "logit"])]


def _export(module: nn.Module, x: Tensor, path: Path, opset: int):
    import onnx

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["input"],
                          output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return onnx.load(str(path))


def measure_gated(gm: GatedModel, dataset, *, task=None, workdir=None, threads=None,
                  compiled=None, latency_samples: int = 500, rounds: int = 5) -> dict[str, Any]:
    """metrics.jsonl fields of a gated stage on test samples: ``macs`` = mean executed MACs,
    ``latency_ms_b1`` = mean batch-1 latency of the deployed graph (``compiled``, else built
    here), ``dynamic``: per block the share of samples that ran it."""
    from lighten.dynamic.runtime import _interleaved, _session_fn

    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=512):
        xs.append(task.as_inputs(x)[0] if task is not None else x)
        ys.append(torch.as_tensor(y))
    x_all = torch.cat(xs)
    if compiled is None:
        import onnx

        path = Path(tempfile.mkdtemp(prefix="lighten-gated-")) / "model.onnx"
        onnx.save(gated_graph(gm, x_all[:1]), str(path))
        compiled = _session_fn(path, threads)
    opened = gm.decisions(x_all)
    executed = gm.executed_macs(opened)
    one = [np.ascontiguousarray(x_all[i:i + 1].numpy()) for i in range(min(latency_samples,
                                                                           len(x_all)))]
    b1 = _interleaved({"deployed": lambda a: compiled(a)}, one, rounds)["deployed"]
    return {
        "macs": int(round(float(executed.mean()))),
        "latency_ms_b1": b1["median"], "latency_ms_b1_spread": b1["spread"],
        "dynamic": {
            "kind": "gating", "form": "one ONNX graph with an If per gate (model.onnx)",
            "thresholds": gm.threshold.tolist(),
            "blocks": [{"name": gm.chain[p], "share": float(opened[:, i].float().mean()),
                        "macs": int(m)} for i, (p, m) in enumerate(zip(gm.gated, gm.block_macs,
                                                                      strict=True))],
            "macs_ratio": float(executed.mean() / gm.total_macs),
            "latency_ms_b1": b1["median"], "latency_ms_b1_spread": b1["spread"],
            "latency_samples": len(one), "rounds": rounds,
        },
    }


__all__ = ["GatedModel", "GatingConfig", "GatingFinetuneConfig", "calibrate_threshold",
           "gated_graph", "gating", "measure_gated"]
