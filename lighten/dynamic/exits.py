"""The multi-exit model: a backbone cut into segments, a small classifier head after each cut.

Why a wrapper around the *unchanged* backbone (and not taps inserted into it): the backbone's
own forward cannot be stopped half-way, but a chain of its modules can. :func:`module_chain`
traces the backbone with every non-container module kept whole and accepts it when the forward
is that chain (each module reads only the previous one's output: LeNet, VGG, ResNet-20's blocks).
:class:`MultiExitModel` then runs the chain itself, with an exit head after chosen positions.

Saved as an artifact it is a registered module type whose config names how to build the
backbone (``backbone_spec``, a ``model:`` spec); the edit log then records what earlier steps
changed inside ``backbone.*`` and the heads as standard layers, like any other change.

Forward (eval): batch 1 outside tracing really stops at the first confident exit; a batch (and
the ONNX export) computes every exit and selects per sample, so both give the same logits.
Training: every exit is computed, the final logits are returned and the earlier exits' logits
are kept in ``exit_logits`` for :func:`exit_loss_term` (joint training).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lighten.errors import CheckpointError, UnsupportedError
from lighten.modules import register_module_type

CRITERIA = ("max_softmax", "entropy")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _ChainTracer(fx.Tracer):
    """Keeps every module except containers whole: a ResNet block is one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, _CONTAINERS)


def module_chain(model: nn.Module, *, step: str = "dynamic.early_exit") -> list[str]:
    """The module paths whose calls, one after the other, are ``model``'s forward.

    UnsupportedError (naming the first node that breaks the chain) for anything else: a
    functional op between modules, a skip connection around modules of the root, two inputs."""
    try:
        graph = _ChainTracer().trace(model)
    except Exception as exc:  # user code: fx cannot trace data-dependent control flow
        raise UnsupportedError(f"{step}: cannot trace {type(model).__name__} into a "
                               f"chain of modules ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:120]}); it needs a forward that "
                               "calls its blocks one after the other (a dynamic step comes "
                               "last, once)") from None
    chain: list[str] = []
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                raise UnsupportedError(f"{step}: the model takes several inputs; it needs a "
                                       "one-input chain of modules")
            previous = node
        elif node.op == "call_module" and node.args == (previous,) and not node.kwargs:
            chain.append(str(node.target))
            previous = node
        elif node.op == "output" and node.args[0] is previous and chain:
            return chain
        else:
            raise UnsupportedError(
                f"{step}: {type(model).__name__}'s forward is not a chain of "
                f"modules: {node.op} {node.target} (after {chain[-1] if chain else 'the input'})"
                " reads something other than the previous module's output; move such ops into "
                "modules (e.g. nn.Flatten) or wrap the model's blocks in an nn.Sequential")
    raise UnsupportedError(f"{step}: {type(model).__name__} has no modules to cut")


def build_head(feature_shape: tuple[int, ...], num_classes: int, kind: str = "conv"
               ) -> nn.Sequential:
    """A small classifier on features of ``feature_shape`` (without batch), standard layers
    only (so the artifact's edit log describes it). ``conv``: one 3x3 conv (stride 2 on maps of
    8+ pixels) + BN + ReLU, global average pool, Linear; ``conv2``: a second strided 3x3 conv of
    twice the width before the pool (on ResNet-20 / Fashion-MNIST the exit after layers.1 went
    from 66% to 85% held-out accuracy for 0.9M more MACs: early features need a wider receptive
    field than one conv gives); ``pool``: global pool + Linear; flat features: one Linear."""
    if len(feature_shape) == 1:
        return nn.Sequential(nn.Linear(feature_shape[0], num_classes))
    if len(feature_shape) != 3:
        raise UnsupportedError(f"dynamic.early_exit: no exit head for features of shape "
                               f"{list(feature_shape)}; exits go after (C, H, W) or (F,) outputs")
    c, h, w = feature_shape
    if kind == "pool":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    width = max(2 * c, 32)
    stride = 2 if min(h, w) >= 8 else 1
    layers = [nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False),
              nn.BatchNorm2d(width), nn.ReLU()]
    if kind == "conv2":
        side = (min(h, w) - 1) // stride + 1  # the first conv's output
        layers += [nn.Conv2d(width, 2 * width, 3, stride=2 if side >= 4 else 1, padding=1,
                             bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()]
        width *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def confidence(logits: Tensor, criterion: str) -> Tensor:
    """Per-sample confidence in [0, 1], higher = surer: the top softmax probability, or
    ``1 - entropy / log(classes)``. An exit is taken when it reaches the exit's threshold."""
    p = F.softmax(logits.float(), dim=-1)
    if criterion == "max_softmax":
        return p.max(dim=-1).values
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
    return 1.0 - entropy / math.log(logits.shape[-1])


@register_module_type
class MultiExitModel(nn.Module):
    """``backbone`` run as a chain of module paths with ``heads[k]`` after ``chain[exits[k]]``;
    ``thresholds[k]`` (a buffer) is the confidence at which exit ``k`` answers."""

    structure_fixed_by = "dynamic.early_exit"  # lighten.graph: no channel surgery after it

    artifact_type = "lighten.dynamic:MultiExitModel"

    def __init__(self, backbone: nn.Module, chain: list[str], exits: list[int],
                 heads: list[nn.Module] | nn.ModuleList, *, criterion: str = "max_softmax",
                 backbone_spec: dict | None = None, input_shape=None, num_classes=None,
                 task: dict | None = None, exit_macs: list[int] | None = None):
        super().__init__()
        if criterion not in CRITERIA:
            raise UnsupportedError(f"criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
        if list(exits) != sorted(set(exits)) or any(not 0 <= i < len(chain) - 1 for i in exits):
            raise UnsupportedError(f"exit positions {exits} must increase inside the chain")
        self.backbone = backbone
        self.heads = heads if isinstance(heads, nn.ModuleList) else nn.ModuleList(heads)
        self.register_buffer("thresholds", torch.full((len(exits),), 2.0))  # 2: never exits
        self.chain = [str(p) for p in chain]
        self.exits = [int(i) for i in exits]
        self.criterion = criterion
        self.backbone_spec = backbone_spec
        self.input_shape = None if input_shape is None else [int(d) for d in input_shape]
        self.num_classes = None if num_classes is None else int(num_classes)
        self.task = task
        self.exit_macs = exit_macs  # executed MACs up to and including exit k; last: full path
        self.exit_logits: list[Tensor] = []
        self._freeze_backbone = False
        self._last_exit = -1

    # ----------------------------------------------------------------- structure
    @property
    def exit_names(self) -> list[str]:
        return [self.chain[i] for i in self.exits] + ["final"]

    def segment_paths(self) -> list[list[str]]:
        """Module paths of each segment: up to exit 0, ..., after the last exit (the final)."""
        cuts = [-1, *self.exits, len(self.chain) - 1]
        return [self.chain[a + 1:b + 1] for a, b in zip(cuts, cuts[1:], strict=False)]

    def segments(self) -> list[list[nn.Module]]:
        return [[self.backbone.get_submodule(p) for p in paths] for paths in self.segment_paths()]

    def dynamic_measure(self, dataset, **kwargs) -> dict[str, Any]:
        """What ``measure_stage`` records for a dynamic stage: executed MACs and batch-1 latency
        of the deployed segment runtime (:func:`lighten.dynamic.runtime.measure_dynamic`)."""
        from lighten.dynamic.runtime import measure_dynamic

        return measure_dynamic(self, dataset, **kwargs)

    def onnx_graph(self, specs, *, opset: int = 17):
        """The deployed ONNX graph (``lighten.export`` asks for it instead of tracing): the
        segments joined by ``If`` nodes, so a confident sample skips the later segments
        (:mod:`lighten.dynamic.onnx_if`)."""
        import tempfile
        from pathlib import Path

        from lighten.dynamic.onnx_if import build_if_graph
        from lighten.dynamic.runtime import export_segments

        if len(specs) != 1 or not specs[0].is_float:
            raise UnsupportedError("an early-exit model exports for one float input")
        with tempfile.TemporaryDirectory() as tmp:
            files = export_segments(self, Path(tmp), torch.zeros(1, *specs[0].shape),
                                    opset=opset)
            return build_if_graph(files, self.thresholds.tolist(), self.criterion,
                                  self._classes(specs[0].shape))

    def _classes(self, shape) -> int:
        if self.num_classes is not None:
            return self.num_classes
        with torch.no_grad():
            return int(self.eval().all_exits(torch.zeros(1, *shape))[-1].shape[-1])

    # ----------------------------------------------------------------- artifact
    def artifact_config(self) -> dict[str, Any]:
        if self.backbone_spec is None:
            raise CheckpointError(
                "cannot save a MultiExitModel whose backbone_spec is unknown: set "
                "model.backbone_spec to how the backbone is built (e.g. {'zoo': 'resnet20'} or "
                "{'python': 'net.py:build', 'input_shape': [1, 28, 28]}) before saving, or run "
                "dynamic.early_exit from a recipe")
        return {"backbone_spec": self.backbone_spec, "input_shape": self.input_shape,
                "num_classes": self.num_classes, "task": self.task, "chain": self.chain,
                "exits": self.exits, "criterion": self.criterion, "exit_macs": self.exit_macs}

    @classmethod
    def from_artifact(cls, config: dict) -> MultiExitModel:
        """The backbone rebuilt from its spec (as the artifact's own source is); the heads
        and whatever changed inside the backbone come from the edit log."""
        from lighten.trust import build_recorded_backbone

        backbone = build_recorded_backbone(config, "MultiExitModel's backbone")
        return cls(backbone, config["chain"], config["exits"], [],
                   criterion=config["criterion"], backbone_spec=config["backbone_spec"],
                   input_shape=config["input_shape"], num_classes=config["num_classes"],
                   task=config.get("task"), exit_macs=config.get("exit_macs"))

    # ----------------------------------------------------------------- training
    def freeze_backbone(self, frozen: bool = True) -> None:
        """Heads-only training: backbone weights fixed and kept in eval mode (BN statistics)."""
        self._freeze_backbone = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        self.exit_logits = []  # graph-holding tensors of the last training batch
        if self._freeze_backbone:
            self.backbone.eval()
        return self

    # ----------------------------------------------------------------- forward
    def all_exits(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit, the final one last (no early stop)."""
        outs = []
        segments = self.segments()
        for k, segment in enumerate(segments):
            for module in segment:
                x = module(x)
            outs.append(self.heads[k](x) if k < len(self.heads) else x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            outs = self.all_exits(x)
            self.exit_logits = outs[:-1]
            return outs[-1]
        if x.shape[0] == 1 and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return self._stop_early(x)
        outs = self.all_exits(x)
        selected = outs[-1]
        for k in reversed(range(len(outs) - 1)):  # the first confident exit wins
            take = confidence(outs[k], self.criterion) >= self.thresholds[k]
            selected = torch.where(take.unsqueeze(-1), outs[k], selected)
        return selected

    def _stop_early(self, x: Tensor) -> Tensor:
        """Batch 1: run segment by segment and return at the first confident exit."""
        for k, segment in enumerate(self.segments()):
            for module in segment:
                x = module(x)
            if k == len(self.heads):
                self._last_exit = k
                return x
            logits = self.heads[k](x)
            if confidence(logits, self.criterion)[0] >= self.thresholds[k]:
                self._last_exit = k
                return logits
        raise AssertionError("unreachable: the last segment always answers")


def exit_loss_term(weight: float = 1.0, *, distill: float = 0.0, temperature: float = 3.0):
    """A ``LossTerm`` for joint training: ``weight`` x the task loss of every earlier exit, plus
    ``distill`` x the soft-target loss of each exit against the final exit (detached), the
    self-distillation of multi-exit networks (Phuong & Lampert 2019)."""
    from lighten.distill import soft_target_loss

    def term(model: nn.Module, x, outputs: Tensor, y: Tensor) -> Tensor:
        exits = getattr(model, "exit_logits", [])
        total = outputs.new_zeros(())
        for logits in exits:
            total = total + weight * F.cross_entropy(logits, y)
            if distill:
                total = total + distill * soft_target_loss(logits, outputs.detach(), temperature)
        return total

    return term

