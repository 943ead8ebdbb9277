"""Re-parameterize multi-branch blocks (RepVGG style) into one convolution.

A training-time block ``act(bn3(conv3x3(x)) + bn1(conv1x1(x)) + bn0(x))`` is, in eval mode, one
``k x k`` convolution: each branch is linear in ``x`` (a BN is a per-channel affine map), a
smaller kernel is the larger one zero-padded around its centre, and the identity is a kernel with
a 1 at the centre tap of its own channel. The sum of linear maps of the same input is the map with
the summed kernels and biases.

The pattern is found on the traced graph, never by class names: an add (or a chain of adds)
whose operands are each ``conv(+BN)``, ``BN`` or the input itself, all reading the same tensor,
with convolutions of one type, stride, groups and channel counts whose padding keeps their
centres aligned. Two ways to write the result, both describable in an artifact:

* the module that *is* the block (its own trace is exactly branches -> add -> activations)
  becomes ``nn.Sequential(fused conv, *activations)``: standard layers only;
* a pattern written inline in a bigger ``forward`` keeps its graph: the main conv receives the
  fused kernel and every other branch's modules become :class:`Zero` (a registered type that
  returns a broadcastable 0) or ``nn.Identity``. A branch that is the bare
  input (no module to replace) stays as it is and is left out of the fused kernel.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lighten.modules import register_module_type

_ADDS = (operator.add, operator.iadd, torch.add)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# parameter-free elementwise activations allowed after the add of a whole block
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                nn.Mish, nn.GELU, nn.LeakyReLU, nn.ELU)
_ACT_FUNCTIONS: dict[Callable, Callable[[], nn.Module]] = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, F.silu: nn.SiLU,
    torch.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh, F.hardswish: nn.Hardswish, F.gelu: nn.GELU,
}
_ACT_METHODS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@register_module_type
class Zero(nn.Module):
    """A removed branch of a re-parameterized sum: 0 of shape (1, ..., 1), which the add
    broadcasts (its rank is the input's, so channel analysis reads it like a drop-path mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((1,) * x.dim())

    def artifact_config(self) -> dict:
        return {}

    @classmethod
    def from_artifact(cls, config: dict) -> Zero:
        return cls()


@dataclass
class Term:
    """One operand of the sum: ``bn(conv(src))``, ``conv(src)``, ``bn(src)`` or ``src``."""

    node: fx.Node
    conv: str | None = None
    bn: str | None = None


@dataclass
class Pattern:
    add: fx.Node  # the outermost add
    adds: list[fx.Node]
    src: fx.Node
    terms: list[Term]

    @property
    def modules(self) -> list[str]:
        return [n for t in self.terms for n in (t.conv, t.bn) if n]


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)) or (
        node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2
        and not node.kwargs and isinstance(node.args[1], fx.Node))


def strip_identity(node, modules: dict[str, nn.Module]):
    while (isinstance(node, fx.Node) and node.op == "call_module"
           and isinstance(modules.get(node.target), nn.Identity)):
        node = node.args[0]
    return node


def _module(node, modules, kinds, calls) -> nn.Module | None:
    """The module ``node`` calls when it is one of ``kinds``, called once, read once."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    m = modules.get(node.target)
    if isinstance(m, kinds) and calls.get(node.target) == 1 and len(node.users) == 1:
        return m
    return None


def _term(node: fx.Node, modules, calls) -> tuple[Term, fx.Node]:
    inner = strip_identity(node, modules)
    term = Term(node)
    if _module(inner, modules, _BATCHNORMS, calls) is not None:
        term.bn = inner.target
        inner = strip_identity(inner.args[0], modules)
    conv = _module(inner, modules, _CONVS, calls)
    if conv is not None and not isinstance(conv, nn.modules.conv._ConvTransposeNd):
        term.conv = inner.target
        inner = strip_identity(inner.args[0], modules)
    return term, inner


def _flatten_sum(top: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the adds, their operands) of ``a + b + c ...`` rooted at ``top``; an inner add read
    elsewhere too is an operand, not part of the sum."""
    adds, leaves, stack = [], [], [top]
    while stack:
        n = stack.pop()
        if is_add(n) and (n is top or len(n.users) == 1):
            adds.append(n)
            stack += [n.args[1], n.args[0]]
        else:
            leaves.append(n)
    return adds, leaves


def find_patterns(gm: fx.GraphModule) -> list[Pattern]:
    """Every maximal sum of branches of one input that could be one convolution."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found = []
    for node in gm.graph.nodes:
        if not is_add(node) or (len(node.users) == 1 and is_add(next(iter(node.users)))):
            continue
        adds, leaves = _flatten_sum(node)
        parsed = [_term(leaf, modules, calls) for leaf in leaves]
        srcs = {id(src) for _, src in parsed}
        terms = [t for t, _ in parsed]
        if len(srcs) != 1 or len(terms) < 2 or not any(t.conv for t in terms):
            continue
        found.append(Pattern(node, adds, parsed[0][1], terms))
    return found


def _padding(conv: nn.Module) -> tuple[int, ...] | None:
    k = conv.kernel_size
    if conv.padding == "valid":
        return (0,) * len(k)
    if conv.padding == "same":
        return tuple((x - 1) // 2 for x in k) if all(x % 2 for x in k) else None
    return tuple(conv.padding)


def check(pattern: Pattern, modules: dict[str, nn.Module]) -> tuple[str | None, str | None]:
    """(main conv name, None) when the pattern fuses exactly, else (None, why not)."""
    convs = [modules[t.conv] for t in pattern.terms if t.conv]
    first = convs[0]
    for c in convs:
        if type(c) is not type(first):
            return None, "branches mix convolution types"
        if c.padding_mode != "zeros" or any(d != 1 for d in c.dilation):
            return None, f"{type(c).__name__} with padding_mode/dilation is not fused"
        if (c.in_channels, c.out_channels, c.groups, tuple(c.stride)) != (
                first.in_channels, first.out_channels, first.groups, tuple(first.stride)):
            return None, "branches differ in channels, groups or stride"
        if _padding(c) is None:
            return None, "padding='same' with an even kernel"
    main = max((t.conv for t in pattern.terms if t.conv),
               key=lambda n: tuple(modules[n].kernel_size))
    big, pad = modules[main].kernel_size, _padding(modules[main])
    for c in convs:
        for kk, pp, K, P in zip(c.kernel_size, _padding(c), big, pad, strict=True):
            if kk > K or (K - kk) % 2 or P - pp != (K - kk) // 2:
                return None, "branch kernels are not centred on one another"
    if any(t.conv is None for t in pattern.terms):  # identity or BN-only branches
        if first.in_channels != first.out_channels or any(s != 1 for s in first.stride):
            return None, "an identity branch needs stride 1 and equal in/out channels"
        if any(K % 2 == 0 or P != (K - 1) // 2 for K, P in zip(big, pad, strict=True)):
            return None, "an identity branch needs an odd kernel with 'same' padding"
    for t in pattern.terms:
        bn = modules.get(t.bn) if t.bn else None
        if bn is not None and (not bn.track_running_stats or bn.running_mean is None
                               or bn.num_features != first.out_channels):
            return None, f"{t.bn} has no running statistics or the wrong width"
    return main, None


def _bn_affine(bn: nn.Module | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BN, in float64; identity when ``bn`` is None."""
    if bn is None:
        return torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    scale = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def fused_kernel(terms: list[Term], modules: dict[str, nn.Module], main: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float64 of the one conv computing the sum of ``terms``."""
    ref = modules[main]
    big = ref.kernel_size
    cout, cin_g = ref.out_channels, ref.in_channels // ref.groups
    weight = torch.zeros(cout, cin_g, *big, dtype=torch.float64)
    bias = torch.zeros(cout, dtype=torch.float64)
    centre = tuple(k // 2 for k in big)
    for t in terms:
        scale, shift = _bn_affine(modules.get(t.bn) if t.bn else None, cout)
        if t.conv:
            conv = modules[t.conv]
            w = conv.weight.double()
            pads = []
            for k, K in zip(reversed(conv.kernel_size), reversed(big), strict=True):
                pads += [(K - k) // 2] * 2
            w = F.pad(w, pads)
            b = conv.bias.double() if conv.bias is not None else torch.zeros_like(bias)
        else:  # identity: a 1 at the centre tap of each channel's own input
            w = torch.zeros_like(weight)
            idx = torch.arange(cout)
            w[(idx, idx % cin_g, *centre)] = 1.0
            b = torch.zeros_like(bias)
        weight += w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        bias += b * scale + shift
    return weight, bias


def new_conv(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A standard conv of ``like``'s geometry with ``weight`` (its kernel size) and a bias."""
    conv = type(like)(like.in_channels, like.out_channels, tuple(weight.shape[2:]),
                      stride=like.stride, padding=_padding(like), groups=like.groups, bias=True,
                      device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.to(like.weight.dtype))
        conv.bias.copy_(bias.to(like.weight.dtype))
    return conv


def activation_of(node: fx.Node, modules) -> nn.Module | None:
    """A fresh module for ``node`` when it is a parameter-free activation, else None."""
    if node.op == "call_module" and isinstance(modules.get(node.target), _ACT_MODULES):
        import copy

        return copy.deepcopy(modules[node.target])
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and not node.kwargs:
        return _ACT_FUNCTIONS[node.target]()
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _ACT_METHODS[node.target]()
    return None


def whole_block(module: nn.Module) -> tuple[nn.Module, list[str]] | None:
    """``(nn.Sequential(fused conv, *activations), fused module names)`` when ``module``'s own
    forward is exactly one fusable sum of branches of its input and activations, else None."""
    from lighten.layers import symbolic_trace

    try:
        gm = symbolic_trace(module)
    except Exception:  # fx raises many types for untraceable code
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    patterns = find_patterns(gm)
    if len(placeholders) != 1 or len(patterns) != 1:
        return None
    p = patterns[0]
    modules = dict(gm.named_modules())
    if strip_identity(p.src, modules) is not placeholders[0]:
        return None
    main, why = check(p, modules)
    if main is None:
        return None
    used = set(placeholders) | set(p.adds)
    for t in p.terms:  # every node on each branch, Identity modules included
        n = t.node
        while n is not p.src:
            used.add(n)
            n = n.args[0]
    acts, node = [], p.add
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        if nxt.op == "output":
            used.add(nxt)
            break
        act = activation_of(nxt, modules)
        if act is None or nxt.args[0] is not node:
            return None
        acts.append(act)
        used.add(nxt)
        node = nxt
    if set(gm.graph.nodes) - used:
        return None
    weight, bias = fused_kernel(p.terms, modules, main)
    fused = new_conv(modules[main], weight, bias)
    return nn.Sequential(fused, *acts), p.modules
