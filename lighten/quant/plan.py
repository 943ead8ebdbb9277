"""Where the quantizers go: a plain plan computed once from a torch.fx trace.

ONNX Runtime runs a conv/linear on integers only when DequantizeLinear feeds it and
QuantizeLinear reads its result. So each quantized layer gets an input quantizer and an output
quantizer placed *after* the ReLU that follows it (the ReLU is absorbed into the layer; the
original ReLU module becomes nn.Identity: a ReLU left between DequantizeLinear and a pool or
add would keep that op in float). A ReLU module right after a residual add becomes
a :class:`~lighten.quant.modules.QuantAct` so the add runs as QLinearAdd. A layer whose input is
another quantized output seen through range-preserving ops (max-pool, flatten, reshape) reuses
that output's parameters: the Q/DQ pair in between then cancels in ORT.

Tensors that meet at a concat (``torch.cat``), directly or through a chunk/split, a channel
shuffle (view/transpose/reshape) or another concat, share one set of quantization parameters
(:attr:`QuantPlan.groups`: their calibrated ranges are merged). The concat of tensors on one
grid is exactly on that grid, so the export (:mod:`lighten.quant.qdq_graph`) can quantize it
again without changing a value, and ONNX Runtime runs the concat, split and shuffle on int8
(QLinearConcat) instead of dequantizing into float between two integer convs. Modules whose
float result feeds a functional op (a sigmoid gate, an average pool before a concat) get an
output quantizer (:class:`~lighten.quant.modules.QuantOutput`, :attr:`QuantPlan.outputs`), so
the sigmoid / pool runs as QLinearSigmoid / QLinearAveragePool. A Linear whose result is read
only by ops that compute in float anyway (GELU, LayerNorm, residual adds feeding those: an
MLP-Mixer or transformer MLP) gets no output quantizer: ORT's int8 matmul emits float itself.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lighten.quant.modules import QUANTIZABLE  # noqa: F401  (re-exported: the float types covered)

RELU_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # in eval
_PASSTHROUGH_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Unflatten,
                        *_NOOP_MODULES)
_PASSTHROUGH_FUNCTIONS = (torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout,
                          torch.reshape)
_PASSTHROUGH_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")
# Exact on a grid too, but not used for reusing parameters across a layer's input (a transpose
# or a chunk before a layer is rare; they matter between concats): values move, never change.
_MOVE_FUNCTIONS = (torch.transpose, torch.permute, torch.chunk, torch.split, operator.getitem,
                   torch.squeeze, torch.unsqueeze)
_MOVE_METHODS = ("transpose", "permute", "chunk", "split", "expand")
_CAT_FUNCTIONS = (torch.cat, torch.concat)
# Ops ONNX Runtime runs in float only (no integer kernel takes them): a Linear read only by
# these (or by residual adds feeding them) keeps a float output (:func:`_float_readers_only`).
_FLOAT_MODULES = (nn.GELU, nn.LayerNorm)
_FLOAT_FUNCTIONS = (F.gelu, F.layer_norm)
# Modules whose output gets a quantizer when a functional op (not a quantized layer) reads it.
_OUTPUT_MODULES = (nn.Sigmoid, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


@dataclass
class LayerPlan:
    name: str
    activation: str = "none"  # ReLU absorbed into the layer before its output quantizer
    input_from: str | None = None  # quant point whose parameters the input reuses
    output_quant: bool = True  # False for a layer whose result is the model output
    absorbed_module: str | None = None  # the ReLU module it absorbs (becomes nn.Identity)


@dataclass
class QuantPlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    acts: list[str] = field(default_factory=list)  # ReLU modules after adds -> QuantAct
    outputs: list[str] = field(default_factory=list)  # sigmoid / pool modules -> QuantOutput
    # quant points (layer, act or output names) whose tensors meet at a concat: one shared scale
    groups: list[list[str]] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None


def make_plan(model: nn.Module, candidates: list[str], *, integer_ops: bool = False
              ) -> QuantPlan:
    """Plan for ``candidates`` (names of QUANTIZABLE modules: Conv1d/2d/3d, Linear).

    ``integer_ops`` (quant.ptq) also plans :attr:`QuantPlan.groups` (shared parameters across
    concats, chunks and channel shuffles) and :attr:`QuantPlan.outputs` (output quantizers of
    sigmoid / pooling modules read by functional ops); without it (quant.qat) neither."""
    try:
        from torch import fx

        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable code
        plan = _plan_from_sequential(model, candidates)
        plan.traced, plan.trace_error = False, f"{type(exc).__name__}: {_first_line(exc)}"
        return plan
    return _plan_from_graph(model, graph, candidates, integer_ops=integer_ops)


def _plan_from_graph(model: nn.Module, graph, candidates: list[str], *,
                     integer_ops: bool = False) -> QuantPlan:
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    wanted = set(candidates)
    plan = QuantPlan()
    points = {}  # fx node -> quant point name (a layer name or a QuantAct name)
    relu_points = set()  # points known to be >= 0
    for node in graph.nodes:  # topological order: producers are planned before consumers
        if node.op != "call_module":
            continue
        if node.target in wanted and calls[node.target] == 1:
            layer = LayerPlan(node.target)
            out_node = node
            nxt = _skip_identities(node, modules)
            kind = _relu_kind(nxt, modules) if nxt is not None else None
            if kind is not None:
                layer.activation, out_node = kind, nxt
                relu_points.add(node.target)
                if nxt.op == "call_module" and calls[nxt.target] == 1:
                    layer.absorbed_module = nxt.target
            src = _trace_back(node.args[0] if node.args else None, modules, points, relu_points,
                              cats=integer_ops)
            layer.input_from = src
            layer.output_quant = not (
                _reaches_output(out_node, modules)
                or (integer_ops and isinstance(modules[node.target], nn.Linear)
                    and _float_readers_only(out_node, modules, wanted)))
            points[out_node] = node.target
            plan.layers[node.target] = layer
        elif node.target in wanted:  # a shared module: no absorption, no reuse
            plan.layers.setdefault(node.target, LayerPlan(node.target))
        elif (type(modules[node.target]) in RELU_MODULES and calls[node.target] == 1
              and node.args and _is_add(node.args[0])):
            plan.acts.append(node.target)
            points[node] = node.target
            relu_points.add(node.target)
        elif (integer_ops and isinstance(modules[node.target], _OUTPUT_MODULES)
              and calls[node.target] == 1 and node.args
              and not _only_layers_read(node, modules, wanted)):
            src = _trace_back(node.args[0], modules, points, relu_points, cats=True)
            if src is None:
                continue
            plan.outputs.append(node.target)
            points[node] = node.target
            if src in relu_points and not isinstance(modules[node.target], nn.Sigmoid):
                relu_points.add(node.target)  # pooling of >= 0 stays >= 0
    for name in candidates:  # not in the graph: never called, reported as not reached
        plan.layers.setdefault(name, LayerPlan(name))
    if integer_ops:
        plan.groups = _concat_groups(graph, modules, points)
    return plan


def _only_layers_read(node, modules, layers) -> bool:
    """True when every reader of ``node`` (past range-preserving ops) is a layer of the plan:
    those quantize their input themselves, an output quantizer would only repeat it."""
    users = list(node.users)
    if not users:
        return False
    for user in users:
        if user.op == "call_module" and user.target in layers:
            continue
        if _is_passthrough(user, modules) and _only_layers_read(user, modules, layers):
            continue
        return False
    return True


def _float_readers_only(node, modules, layers, seen=None) -> bool:
    """True when every reader of ``node`` computes in float whatever it is given: GELU,
    LayerNorm, or a residual add whose own result reaches only such ops (through moves).
    A Linear read only by those gains nothing from an output quantizer: ONNX Runtime runs its
    int8 matmul with a float result and the bias fused (MatMulIntegerToFloat, QGemm), and the
    quantize/dequantize pair in between would only cost time and add rounding error."""
    seen = {} if seen is None else seen
    if node in seen:
        return seen[node]
    seen[node] = False  # (a graph has no cycles; keeps a revisit finite)
    users = list(node.users)
    ok = bool(users)
    for user in users:
        if user.op == "output" or (user.op == "call_module" and user.target in layers):
            ok = False
        elif _is_float_op(user, modules):
            continue
        elif _is_add(user) or _is_passthrough(user, modules) or _is_move(user):
            ok = _float_readers_only(user, modules, layers, seen)
        else:
            ok = False
        if not ok:
            break
    seen[node] = ok
    return ok


def _is_float_op(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _FLOAT_MODULES)
    return node.op == "call_function" and node.target in _FLOAT_FUNCTIONS


def _concat_groups(graph, modules, points) -> list[list[str]]:
    """Quant points whose values meet at a concat (through moves and other concats)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    grid: dict = {}  # fx node -> the quant point whose grid its values lie on exactly
    for node in graph.nodes:
        if node in points:
            grid[node] = points[node]
        elif _is_cat(node):
            srcs = [grid.get(a) for a in node.args[0]]
            if srcs and all(srcs):
                for other in srcs[1:]:
                    parent[find(other)] = find(srcs[0])
                grid[node] = srcs[0]
        elif (_is_passthrough(node, modules) or _is_move(node)) and node.args:
            src = grid.get(node.args[0]) if hasattr(node.args[0], "op") else None
            if src is not None:
                grid[node] = src
    members: dict[str, list[str]] = {}
    for name in parent:
        members.setdefault(find(name), []).append(name)
    return [sorted(m) for m in members.values() if len(m) > 1]


def _is_cat(node) -> bool:
    return (node.op == "call_function" and node.target in _CAT_FUNCTIONS and bool(node.args)
            and isinstance(node.args[0], (list, tuple))
            and (node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) is not None))


def _is_move(node) -> bool:
    if node.op == "call_function":
        return node.target in _MOVE_FUNCTIONS
    return node.op == "call_method" and node.target in _MOVE_METHODS


def _plan_from_sequential(model: nn.Module, candidates: list[str]) -> QuantPlan:
    """Without a trace: absorb a ReLU that directly follows a layer inside the same Sequential."""
    plan = QuantPlan(layers={name: LayerPlan(name) for name in candidates})
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, _), (_, b) in zip(children, children[1:], strict=False):
            full = f"{name}.{a_name}" if name else a_name
            if full in plan.layers and type(b) in RELU_MODULES:
                plan.layers[full].activation = RELU_MODULES[type(b)]
    return plan


def _relu_kind(node, modules) -> str | None:
    if node.op == "call_module":
        return RELU_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return _RELU_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _skip_identities(node, modules):
    """The sole consumer of ``node`` past no-op modules (a folded BN is an nn.Identity)."""
    while len(node.users) == 1:
        (node,) = node.users
        if not (node.op == "call_module" and isinstance(modules[node.target], _NOOP_MODULES)):
            return node
    return None


def _is_add(node) -> bool:
    if not hasattr(node, "op"):
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_passthrough(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _PASSTHROUGH_METHODS


def _trace_back(node, modules, points, relu_points, *, cats: bool = False) -> str | None:
    """The quant point feeding ``node`` through range-preserving ops, if any (``cats``: also
    through concats, chunks and transposes, whose sources share one grid)."""
    while hasattr(node, "op"):
        if node in points:
            return points[node]
        if _relu_kind(node, modules) == "relu" and node.args:
            src = _trace_back(node.args[0], modules, points, relu_points, cats=cats)
            return src if src in relu_points else None  # ReLU of a >= 0 tensor changes nothing
        if cats and _is_cat(node):  # a concat of one group's tensors is on that group's grid
            srcs = [_trace_back(a, modules, points, relu_points, cats=True) for a in node.args[0]]
            if not srcs or not all(srcs):
                return None
            return srcs[0]
        if not ((_is_passthrough(node, modules) or (cats and _is_move(node))) and node.args):
            return None
        node = node.args[0]
    return None


def _reaches_output(node, modules) -> bool:
    """True when ``node``'s value becomes the model output through range-preserving ops only."""
    while True:
        users = list(node.users)
        if any(u.op == "output" for u in users):
            return True
        if len(users) != 1 or not _is_passthrough(users[0], modules):
            return False
        node = users[0]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
