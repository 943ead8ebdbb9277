"""Remove whole residual blocks (``prune.layers``): ``y = act(x + branch(x))`` becomes ``act(x)``.

Blocks are found by tracing, not by class names: every non-leaf submodule is traced alone with
``torch.fx``; it is a removable residual block when its output is an add (optionally followed by
parameter-free activations) one of whose operands is the block's own input (directly or through
``nn.Identity``) and whose operands and input all have the same shape (checked by running the
block on the input it really receives). A block whose shortcut is a layer (a projection on a
shape change) is reported with ``ctx.note`` and kept.

Why the activation is kept: a ResNet basic block computes ``relu(x + branch(x))``. Replacing it by
``nn.Identity`` would drop that ReLU, so the block becomes :class:`SkippedBlock` holding the same
post-add activations: exactly "the block without its branch". (After a ReLU-ending block ``x`` is
already non-negative and the ReLU changes nothing, but a user's block need not be.) Blocks with
nothing after the add become ``nn.Identity``. Both round-trip through the artifact.

Nested candidates (a ``Sequential`` holding exactly one block) resolve to the innermost block.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import fx, nn

from lighten.errors import LightenError, ModelError, UnsupportedError
from lighten.modules import register_module_type, require_modules, set_submodule
from lighten.prune.importance import summed_loss, task_summed_loss
from lighten.registry import register_step
from lighten.step import PruneStepConfig, StepContext

__all__ = ["LayerPruneConfig", "LayerPruneReport", "ResidualBlock", "SkippedBlock",
           "find_residual_blocks", "prune_layers_"]

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # labelled (x, y)


class LayerPruneConfig(PruneStepConfig):
    count: int | None = Field(None, ge=1, description="number of residual blocks removed")
    ratio: float | None = Field(None, gt=0, lt=1,
                                description="fraction of the removable blocks removed")
    importance: Literal["branch_l2", "taylor", "random"] = "branch_l2"
    ignore: list[str] = Field(default_factory=list, description="modules never removed")
    calibration_samples: int = Field(256, ge=1, description="samples for branch_l2 / taylor")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.count is None) == (self.ratio is None):
            raise ValueError("give exactly one of count (blocks removed) or ratio (fraction of "
                             "removable blocks removed)")
        return self


# ----------------------------------------------------------------------------- activations
# Parameter-free ops allowed after the residual add, as DATA: module type -> constructor args
# that define it; functions / tensor methods -> the module type that does the same.
ACTIVATION_MODULES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.ReLU: (), nn.ReLU6: (), nn.SiLU: (), nn.Sigmoid: (), nn.Tanh: (), nn.Hardswish: (),
    nn.Hardsigmoid: (), nn.Mish: (), nn.GELU: ("approximate",),
    nn.LeakyReLU: ("negative_slope",), nn.ELU: ("alpha",),
}
ACTIVATION_FUNCTIONS: dict[Callable, type[nn.Module]] = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, F.silu: nn.SiLU,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh, F.tanh: nn.Tanh,
    F.hardswish: nn.Hardswish, F.mish: nn.Mish, F.gelu: nn.GELU,
}
ACTIVATION_METHODS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
}
_ACT_BY_NAME = {cls.__name__: cls for cls in ACTIVATION_MODULES}
_ADDS = (operator.add, operator.iadd, torch.add)


def _activation(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """A fresh, non-inplace module equal to ``node`` if it is a known activation, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        args = ACTIVATION_MODULES.get(type(module))
        if args is None:
            return None
        return type(module)(**{a: getattr(module, a) for a in args})
    if len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
        return None  # extra arguments (a slope, approximate=...) are not recorded: refuse
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        return ACTIVATION_FUNCTIONS[node.target]()
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        return ACTIVATION_METHODS[node.target]()
    return None


@register_module_type
class SkippedBlock(nn.Sequential):
    """What is left of a removed residual block: the activations that followed its add."""

    def __init__(self, *activations: nn.Module):
        super().__init__(*activations)

    def forward(self, x, *_, **__):  # a block's other arguments (masks) fed only its branch
        for activation in self:
            x = activation(x)
        return x

    def artifact_config(self) -> dict:
        return {"activations": [
            {"type": type(m).__name__,
             "kwargs": {a: getattr(m, a) for a in ACTIVATION_MODULES[type(m)]}} for m in self]}

    @classmethod
    def from_artifact(cls, config: dict) -> SkippedBlock:
        acts = []
        for entry in config["activations"]:
            act = _ACT_BY_NAME.get(entry["type"])
            if act is None:
                raise ValueError(f"unknown activation {entry['type']!r}")
            acts.append(act(**entry["kwargs"]))
        return cls(*acts)


# ----------------------------------------------------------------------------- detection


@dataclass
class ResidualBlock:
    """A removable block: ``path`` computes ``activations(x + branch(x))``."""

    path: str
    activations: list[nn.Module]
    branch: str  # name of the branch's fx node in a fresh trace of the block
    # True when ``branch`` names the block's last residual add (a pre-norm transformer block,
    # x + attn(x) + mlp(...)): the removed part is then that sum minus the block's input
    summed: bool = False
    extra_args: bool = False  # forward takes more than x (a transformer layer's masks)

    def replacement(self) -> nn.Module:
        keep = self.activations or self.extra_args  # nn.Identity takes x alone
        return SkippedBlock(*self.activations) if keep else nn.Identity()


def trace_block(module: nn.Module) -> tuple[fx.GraphModule, dict]:
    """``module`` traced on its first argument alone, its other (optional) arguments at their
    defaults (a transformer layer's masks: None), and those defaults by name. Raises what
    tracing raises, TypeError for a second argument without a default."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())[1:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.KEYWORD_ONLY)
    concrete = {}
    for param in params:
        if param.kind not in positional:
            continue  # *args / **kwargs: nothing to fix
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"argument {param.name!r} has no default")
        concrete[param.name] = param.default
    return fx.symbolic_trace(module, concrete_args=concrete or None), concrete


@dataclass
class _Found:
    blocks: list[ResidualBlock] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _block_inputs(model: nn.Module, example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """The single tensor each submodule receives on ``example_input``; a call whose other
    arguments are at their defaults counts (a transformer layer given mask=None), any other
    call is skipped."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def record(module, args, kwargs):
            if args and isinstance(args[0], torch.Tensor) and _rest_at_defaults(
                    module, args, kwargs):
                seen.setdefault(name, args[0].detach())
        return record

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        _run_eval(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _rest_at_defaults(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Every argument of the call but the first is what the forward defaults it to."""
    import inspect

    if len(args) == 1 and not kwargs:
        return True
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return False
    params = signature.parameters
    for name, value in list(bound.arguments.items())[1:]:
        default = params[name].default
        if default is inspect.Parameter.empty or not (value is default or (
                isinstance(value, (bool, int, float, str)) and value == default)):
            return False
    return True


def _run_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)


def _strip_identity(gm: fx.GraphModule, node) -> object:
    while (isinstance(node, fx.Node) and node.op == "call_module"
           and isinstance(gm.get_submodule(node.target), nn.Identity)):
        node = node.args[0]
    return node


def _reaches(node: fx.Node, target: fx.Node, *, through_adds: bool) -> bool:
    """Does ``node`` depend on ``target``? Optionally without passing through another add."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen or (not through_adds and n is not node and _is_add(n)):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _analyse(path: str, module: nn.Module, x: torch.Tensor, found: _Found) -> None:
    """Classify one submodule: removable block, projection block (noted) or neither."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm, defaults = trace_block(module)
    except Exception:  # not traceable on its own: cannot be proven a residual block
        return
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    # the other arguments' placeholders only check that they hold their defaults
    if len(inputs) != 1 + len(defaults) or not isinstance(output.args[0], fx.Node):
        return
    node, acts = output.args[0], []
    while not _is_add(node):
        act = _activation(gm, node)
        if act is None or not isinstance(node.args[0], fx.Node):
            return
        acts.insert(0, act)
        node = node.args[0]
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return
    x_node = inputs[0]
    summed = False
    if _strip_identity(gm, a) is x_node and _strip_identity(gm, b) is not x_node:
        branch = b
    elif _strip_identity(gm, b) is x_node and _strip_identity(gm, a) is not x_node:
        branch = a
    elif _residual_chain(gm, node, x_node):
        branch, summed = node, True
    else:
        if all(_reaches(op, x_node, through_adds=False) for op in (a, b)):
            found.notes.append(f"{path}: residual block with a projection shortcut (a layer on "
                               "the skip path, e.g. a shape change) is not removable")
        return
    if not _reaches(branch, x_node, through_adds=True):
        return  # x + constant: not a residual branch
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x, *defaults.values())
    except Exception:
        return
    adds = _chain_adds(gm, node, x_node) if summed else [node]
    shapes = {tuple(n.meta["tensor_meta"].shape) for add in adds for n in (*add.args[:2], add)
              } | {tuple(x.shape)}
    if len(shapes) != 1:
        found.notes.append(f"{path}: residual add with shapes {sorted(shapes)} (broadcast) is "
                           "not removable")
        return
    found.blocks.append(ResidualBlock(path, acts, branch.name, summed, bool(defaults)))


def _chain_adds(gm: fx.GraphModule, node: fx.Node, x_node: fx.Node) -> list[fx.Node]:
    """The adds of ``x + f1(x) + f2(x + f1(x)) + ...`` from the last back to the first whose skip
    operand is the input, or [] when ``node`` is not such a chain."""
    chain = []
    while _is_add(node) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1 and all(
            isinstance(op, fx.Node) for op in node.args):
        chain.append(node)
        a, b = (_strip_identity(gm, op) for op in node.args)
        for skip, branch in ((a, b), (b, a)):
            if not _reaches(branch, x_node, through_adds=True):
                continue
            if skip is x_node:
                return chain
            if _is_add(skip):
                node = skip
                break
        else:
            return []
    return []


def _residual_chain(gm: fx.GraphModule, node: fx.Node, x_node: fx.Node) -> bool:
    return len(_chain_adds(gm, node, x_node)) >= 2


def find_residual_blocks(model: nn.Module, example_input: torch.Tensor, *,
                         ignore: Iterable[str] = ()) -> tuple[list[ResidualBlock], list[str]]:
    """Removable residual blocks (innermost, graph order) and notes on blocks that are not."""
    ignore = list(ignore)
    require_modules(model, ignore, key="ignore")
    inputs = _block_inputs(model, example_input)
    tracer, found = fx.Tracer(), _Found()
    was_training = model.training
    try:
        for path, module in model.named_modules():
            if path and path in inputs and not tracer.is_leaf_module(module, path):
                _analyse(path, module, inputs[path], found)
    finally:
        model.train(was_training)
    paths = [b.path for b in found.blocks]
    blocks = [b for b in found.blocks
              if not any(p.startswith(b.path + ".") for p in paths)  # innermost only
              and not any(_related(b.path, i) for i in ignore)]
    return blocks, found.notes


def _related(path: str, other: str) -> bool:
    return path == other or path.startswith(other + ".") or other.startswith(path + ".")


# ----------------------------------------------------------------------------- importance


class _Tap(nn.Module):
    """Identity that hands the branch output to its probe (and keeps its gradient)."""

    def __init__(self, probe: _Probe):
        super().__init__()
        self.probe = [probe]  # a list: not a registered child, no cycle in the module tree

    def forward(self, t):
        if t.requires_grad:
            t.retain_grad()
        self.probe[0].branch = t
        return t


class _Probe(nn.Module):
    """Stands in for a block while scoring: same computation, remembers input and branch."""

    def __init__(self, block: nn.Module, branch: str):
        super().__init__()
        gm, _ = trace_block(block)
        node = next(n for n in gm.graph.nodes if n.name == branch)
        gm.add_submodule("lighten_tap", _Tap(self))
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module("lighten_tap", (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
        gm.recompile()
        self.gm, self.x, self.branch = gm, None, None

    def forward(self, x, *_, **__):  # traced with its other arguments at their defaults
        self.x = x
        return self.gm(x)


def _block_scores(model: nn.Module, blocks: list[ResidualBlock], importance: str,
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
                  seed: int, *, loss: Callable | None = None) -> list[float]:
    """One score per block; low = remove first.

    branch_l2: mean over samples of ||branch(x)|| / ||x|| (a branch that adds little to its
    input is the cheapest to drop). taylor: mean over samples of |<dL/d branch, branch>|, the
    first-order change of the loss when the branch output is set to zero.
    """
    from lighten.prune.importance import batch_size, run_model

    loss = loss or summed_loss
    if importance == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(blocks), generator=g).tolist()
    if batches is None:
        raise UnsupportedError(f"importance {importance!r} needs calibration data; pass "
                               "batches= (the recipe step takes them from the training set)")
    originals = {b.path: model.get_submodule(b.path) for b in blocks}
    probes = {b.path: _Probe(originals[b.path], b.branch) for b in blocks}
    summed = {b.path: b.summed for b in blocks}
    totals, seen = torch.zeros(len(blocks), dtype=torch.float64), 0
    was_training = model.training
    model.eval()
    try:
        for path, probe in probes.items():
            set_submodule(model, path, probe)
        for x, y in batches:
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
                loss(run_model(model, x), y).backward()
            else:
                with torch.no_grad():
                    run_model(model, x)
            for i, b in enumerate(blocks):
                p = probes[b.path]
                branch = p.branch.detach().flatten(1)
                if summed[b.path]:  # the tap holds x + all branches: what removal takes away
                    branch = branch - p.x.detach().flatten(1)
                if importance == "taylor":
                    per_sample = (branch * p.branch.grad.flatten(1)).sum(1).abs()
                else:
                    per_sample = branch.norm(dim=1) / (p.x.detach().flatten(1).norm(dim=1) + 1e-12)
                totals[i] += per_sample.double().sum()
            seen += batch_size(x)
    finally:
        for path, module in originals.items():
            set_submodule(model, path, module)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise LightenError(f"importance {importance!r} got no calibration batches; give it data")
    return (totals / seen).tolist()


# ----------------------------------------------------------------------------- the library call


@dataclass
class LayerPruneReport:
    removed: list[str]
    scores: dict[str, float]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        removed = ", ".join(f"{p} ({self.scores[p]:.3g})" for p in self.removed)
        return (f"prune.layers: removed {len(self.removed)} residual block(s): {removed}; MACs "
                f"{self.macs_after / max(self.macs_before, 1):.1%} and params "
                f"{self.params_after / max(self.params_before, 1):.1%} of before")


def prune_layers_(model: nn.Module, config: LayerPruneConfig, example_input: torch.Tensor, *,
                  batches: Batches | None = None, seed: int = 0,
                  loss: Callable | None = None) -> LayerPruneReport:
    """Remove the least important residual blocks of ``model`` in place.

    ``batches()`` yields labelled ``(x, y)`` batches (branch_l2 uses only ``x``); ``loss``
    (outputs, targets) -> batch sum scores taylor (default: cross-entropy over the last axis).
    """
    from lighten.measure import count_macs, count_params

    input_shape = example_input  # MACs counted on the real example (token ids stay int64)
    from lighten.unfused import unfuse_

    out_shape = tuple(_run_eval(model, example_input).shape)
    # PyTorch's transformer layers cannot be traced (fused fast paths); their unfused forms,
    # which compute the same, show a pre-norm layer's two residual adds
    unfuse_notes: list[str] = []
    unfused = unfuse_(model, ignore=config.ignore, attention=False, notes=unfuse_notes)
    blocks, found = find_residual_blocks(model, example_input, ignore=config.ignore)
    n = len(blocks)
    if n == 0:
        raise UnsupportedError(
            "no removable residual block found: a submodule whose forward returns input + "
            "branch(input) (or a chain of such adds, as in a pre-norm transformer layer) with "
            "equal shapes; residual adds written inline in a parent's forward are not blocks "
            "(move each block into its own module)" + (f"; {found[0]}" if found else ""))
    notes = ([f"{', '.join(unfused)}: PyTorch transformer blocks unfused into plain modules so "
              "their residual adds can be traced", *unfuse_notes] if unfused else []) + found
    k = config.count if config.count is not None else round(config.ratio * n)
    if k > n:
        raise UnsupportedError(f"count: {k} but the model has only {n} removable residual "
                               f"block(s) ({', '.join(b.path for b in blocks)}); lower count")
    if k == 0:
        raise UnsupportedError(f"ratio: {config.ratio} of {n} removable blocks rounds to 0; "
                               "raise ratio or give count")
    macs_before, params_before = count_macs(model, input_shape), count_params(model)[0]
    scores = _block_scores(model, blocks, config.importance,
                           batches() if batches is not None else None, seed, loss=loss)
    order = sorted(range(n), key=lambda i: (scores[i], i))[:k]
    removed = [blocks[i] for i in sorted(order)]
    for block in removed:
        set_submodule(model, block.path, block.replacement())
    if tuple(_run_eval(model, example_input).shape) != out_shape:
        raise ModelError(f"removing blocks changed the output shape from {out_shape}; this is a "
                         "lighten bug, please report it with the model")
    return LayerPruneReport(
        removed=[b.path for b in removed],
        scores={b.path: s for b, s in zip(blocks, scores, strict=True)},
        macs_before=macs_before, macs_after=count_macs(model, input_shape),
        params_before=params_before, params_after=count_params(model)[0], notes=notes)


@register_step("prune.layers", LayerPruneConfig,
               needs_data=lambda c: "example inputs and samples to score the blocks")
def prune_layers(model: nn.Module, config: LayerPruneConfig, ctx: StepContext) -> nn.Module:
    """Remove whole residual blocks (keeping their post-add activation), least important first."""
    report = prune_layers_(model, config, ctx.example_input(), seed=ctx.seed,
                           batches=lambda: ctx.labelled_batches(config.calibration_samples),
                           loss=task_summed_loss(ctx.task))
    ctx.note(report.summary())
    for line in report.notes:
        ctx.note(f"prune.layers: {line}")
    for path, score in report.scores.items():
        removed = path in report.removed
        ctx.layer(path, "remove" if removed else "keep", before="residual block",
                  after="removed" if removed else "kept", score=score)
    ctx.summary.update(macs_before=report.macs_before, macs_after=report.macs_after)
    ctx.finetune(model, config.finetune)
    return model
