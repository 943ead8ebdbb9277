"""Channel-dependency analysis: which tensors' channels must be pruned together.

One ``torch.fx`` trace plus shape propagation. Every traced value gets a *layout*: its channel
axis and the channel *spaces* (in order, with offsets) that make up that axis. Spaces that meet
at a residual add or a channel-wise multiply are merged (union-find); a concatenation lays spaces
side by side; a flatten before a Linear turns one channel into a block of H*W features.
Grouped convolutions and channel shuffles *tie* channels: a conv with ``g`` groups must keep the
same channels in every group, so channel ``c`` and ``c + C/g`` become copies of one channel (the
space is split into ``g`` copies); a shuffle then interleaves the copies (a block of ``g``).
Keeping the *same* channels per group (not merely as many) is stricter than needed but keeps
every member a plain (offset, block) slice, so importance, ``round_to`` and surgery need nothing
special: one group channel is g filters. Where the groups cannot be tied (a concat straddling
them) the conv is kept whole; a view that hard-codes a channel count pins those channels (or, in
a shuffle, is refused) because the pruned model would reshape wrongly. A transposed conv is a
conv whose weight holds its outputs on axis 1 (its members say ``transposed``). A parameter
combined per channel -- added, multiplied, or concatenated along another axis like a ViT cls
token, maybe after an ``expand``, indexed ``w[:, None, None]`` or viewed ``(1, -1, 1, 1)`` -- is
sliced with the channels. A ``chunk`` / ``split`` of the channel axis into parts the forward
computes (ShuffleNetV2's halves) ties the parts like a grouped conv's groups; a join that holds
runs of a space's channels as one (shuffled copies) *coarsens* that space. A mean over the
channel axis with ``keepdim`` (a LayerNorm written out) is a statistic: one pinned channel,
broadcast back. A call the tables lack -- a ``torch.fx.wrap``'d ``drop_path``, a leaf module
without a kind -- is run on random inputs: it is followed when it acts on each channel alone.
How channels flow through each operator is DATA (:data:`MODULE_KINDS`, :data:`FUNCTION_KINDS`,
:data:`METHOD_KINDS`); anything else that the probe cannot show to act per channel is refused
with an :class:`~lighten.errors.UnsupportedError` naming the node and the user's options.

The output is a plain list of :class:`Group`. Pruning algorithms consume it and never trace.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from lighten.errors import UnsupportedError
from lighten.layers import module_kinds_view, symbolic_trace

__all__ = ["Group", "Member", "channel_groups"]


@dataclass(frozen=True)
class Member:
    """One tensor axis that a group slices: ``module``'s weight along ``axis``.

    Channel ``c`` of the group is index range ``offset + c*block ... offset + (c+1)*block - 1``
    of that axis (``block`` > 1 only for a Linear after a flatten: one channel = H*W features).
    ``transposed`` marks a transposed conv, whose weight is (in, out/groups, k...): its output
    channels are weight axis 1 and its inputs axis 0, the reverse of every other layer.
    """

    module: str
    kind: str  # "out" | "in" | "depthwise" | "norm" | "param:NAME:DIM" (a stored tensor)
    offset: int = 0
    block: int = 1
    transposed: bool = False

    @property
    def axis(self) -> int:
        if self.kind.startswith("param:"):  # param:NAME:DIM, a module's own tensor
            return int(self.kind.rsplit(":", 1)[1])
        if self.transposed and self.kind in ("out", "in"):
            return 0 if self.kind == "in" else 1
        return 1 if self.kind == "in" else 0

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """Positions along :attr:`axis` that ``channels`` (int64) occupy, ``block`` each."""
        return (self.offset + channels[:, None] * self.block + torch.arange(self.block)).flatten()

    def rows(self, t: torch.Tensor, size: int) -> torch.Tensor:
        """The part of ``t`` (this member's weight, gradient or norm scale) that belongs to each
        of ``size`` channels: (size, k). Blocks count on either axis (after a channel shuffle a
        depthwise conv or a BatchNorm holds ``block`` rows per channel)."""
        span = t.narrow(self.axis, self.offset, size * self.block).movedim(self.axis, 0)
        return span.reshape(size, -1)


@dataclass
class Group:
    """Channels that must be removed together: index ``c`` means the same channel everywhere."""

    size: int
    members: list[Member]
    pinned: list[str] = field(default_factory=list)  # why it must stay whole

    @property
    def prunable(self) -> bool:
        return not self.pinned and self.size > 1

    def producers(self) -> list[Member]:
        """Members whose weights *create* the channels (filters, neurons, depthwise kernels)."""
        return [m for m in self.members if m.kind in ("out", "depthwise")]

    def __str__(self) -> str:
        parts = ", ".join(f"{m.module}:{m.kind}" + ("(T)" if m.transposed else "")
                          + (f"@{m.offset}" if m.offset else "")
                          + (f"x{m.block}" if m.block > 1 else "") for m in self.members)
        pin = f" pinned ({'; '.join(self.pinned)})" if self.pinned else ""
        return f"Group({self.size} ch: {parts}){pin}"


@dataclass(frozen=True)
class _Seg:
    space: int
    size: int
    block: int = 1


@dataclass(frozen=True)
class _Layout:
    axis: int  # non-negative channel axis of the value
    segs: tuple[_Seg, ...]

    @property
    def width(self) -> int:
        """Length of the channel axis."""
        return sum(s.size * s.block for s in self.segs)


@dataclass(frozen=True)
class _Split:
    """The channel axis viewed as two axes ``(groups, width // groups)`` -- the first half of a
    channel shuffle; ``swapped`` once a transpose exchanged them. Only a merge may follow."""

    layout: _Layout
    groups: int
    swapped: bool = False


# ----------------------------------------------------------------------------- operator facts
# How channels flow through an operator, by kind:
#   conv / linear   consume channels on the input, create a new space on the output
#   convt           a transposed conv: as conv, but its weight holds outputs on axis 1
#   batchnorm       per-channel parameters on axis 1; layout unchanged
#   layernorm       per-feature parameters on the last axis; layout unchanged
#   groupnorm       mixes channels within groups: coupled spaces stay whole
#   same            shape-preserving along the channel axis (activations, pooling, dropout)
#   elementwise     broadcasting binary op: operands with that channel axis share one space
#   cat             concatenation: along the channel axis spaces sit side by side
#   reshape         flatten / view: allowed when the channel axis survives (or is flattened last),
#                   or splits it in two / merges it back (the two halves of a channel shuffle)
#   broadcast       expand / expand_as: new leading axes; the channel axis must keep its size
#   permute         transpose / permute: the channel axis moves; swapping the two halves of a
#                   split channel axis is a channel shuffle
#   shuffle         nn.ChannelShuffle
#   reduce          mean/sum over non-channel axes; a mean (var, std) over the channel axis
#                   with keepdim is a normalization statistic: one pinned channel, broadcast back
#   chunk           chunk / split: along the channel axis, equal parts computed at run time are
#                   tied (kept alike, as a grouped conv's groups); fixed sizes pin the parts
#   layer_norm      F.layer_norm over the channel axis (a LayerNorm2d written with permutes)
#   fresh           x.new_empty(...) and kin: a new tensor whose channel axis is 1 (a drop-path
#                   mask) or x's
#   (none)          a function torch.fx.wrap keeps as a leaf, or a leaf module without a kind,
#                   is probed: channels pass through when it acts on each channel on its own
#   attention       nn.MultiheadAttention: query/key/value share its embedding channels (in_proj
#                   columns, last axis); its output's are out_proj's rows; returns (out, weights)
#   roll            torch.roll along axes other than the channel axis (a shifted window)
#   meta            returns no tensor (x.size(), x.dim(), getitem on a tuple)
#   refuse          moves or selects channels (split, chunk, roll, repeat): not analysable

# Module kinds live in each layer type's spec (lighten.layers); this is a live view of them.
MODULE_KINDS: Mapping[type[nn.Module], str] = module_kinds_view()

FUNCTION_KINDS: dict[Callable, str] = {
    **{fn: "same" for fn in (
        F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
        F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.max_pool1d, F.max_pool2d,
        F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d, F.interpolate, F.pad, torch.relu, torch.sigmoid, torch.tanh,
        F.sigmoid, F.tanh, torch.clamp, torch.clone)},
    **{fn: "elementwise" for fn in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
        operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
        torch.minimum)},
    torch.cat: "cat", torch.concat: "cat",
    torch.flatten: "reshape", torch.reshape: "reshape",
    torch.mean: "reduce", torch.sum: "reduce", torch.amax: "reduce",
    getattr: "meta", operator.getitem: "getitem",
    torch.permute: "permute", torch.transpose: "permute", torch.split: "chunk",
    torch.chunk: "chunk", torch.roll: "refuse",
}

METHOD_KINDS: dict[str, str] = {
    **{m: "same" for m in ("relu", "relu_", "sigmoid", "tanh", "clamp", "contiguous", "clone",
                           "float", "detach")},
    **{m: "elementwise" for m in ("add", "add_", "sub", "mul", "mul_", "div")},
    "flatten": "reshape", "view": "reshape", "reshape": "reshape",
    "mean": "reduce", "sum": "reduce", "amax": "reduce",
    "size": "meta", "dim": "meta",
    "permute": "permute", "transpose": "permute", "t": "permute",
    "expand": "broadcast", "expand_as": "broadcast",
    **{m: "refuse" for m in ("roll", "unbind", "repeat")},
}

# Normalization written out (ConvNeXt's channels-first LayerNorm), channel splits (ShuffleNetV2),
# stochastic depth traced through (timm's drop_path in training mode).
FUNCTION_KINDS.update({
    **{fn: "same" for fn in (torch.sqrt, torch.rsqrt, torch.exp, torch.abs, operator.neg,
                             torch.zeros_like, torch.ones_like, torch.rand_like,
                             torch.randn_like, torch.empty_like, torch.bernoulli)},
    operator.pow: "elementwise", torch.pow: "elementwise",
    torch.var: "reduce", torch.std: "reduce",
    F.layer_norm: "layer_norm",
})
METHOD_KINDS.update({
    **{m: "same" for m in ("sqrt", "rsqrt", "exp", "abs", "neg", "bernoulli_")},
    **{m: "elementwise" for m in ("pow", "div_", "sub_")},
    "var": "reduce", "std": "reduce", "split": "chunk", "chunk": "chunk", "unsqueeze": "reshape",
    **{m: "fresh" for m in ("new_empty", "new_zeros", "new_ones", "new_full")},
})


# Transformer families: shifted windows roll spatial axes (Swin).
FUNCTION_KINDS[torch.roll] = "roll"
METHOD_KINDS["roll"] = "roll"


def _module_kind(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls in MODULE_KINDS:
            return MODULE_KINDS[cls]
    return None


# ----------------------------------------------------------------------------- analysis


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[Group]:
    """Trace ``model`` and return its channel groups (pinned ones included, in graph order)."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = symbolic_trace(model)  # registered layer types stay one call
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise UnsupportedError(f"structured pruning needs a torch.fx-traceable model; tracing "
                               f"{type(model).__name__} failed ({type(err).__name__}: {first}); "
                               "remove data-dependent control flow from forward") from None
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        model.train(was_training)
    return _Analysis(gm, model).run()


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _where(node: fx.Node) -> str:
    """The module a node belongs to, for error messages."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()), None) if stack else None
    path = owner[0] if isinstance(owner, tuple) else None
    return f"node {node.name!r}" + (f" in module {path!r}" if path else "")


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"tensor.{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _literal_size(node: fx.Node, axis: int) -> int | None:
    """The size a view/reshape hard-codes for output ``axis`` (None if computed or -1)."""
    if node.op == "call_module" or node.target in ("flatten", torch.flatten, "unsqueeze"):
        return None
    sizes = node.args[1:] or (node.kwargs.get("shape"),)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    size = sizes[axis] if axis < len(sizes) else None
    return size if isinstance(size, int) and size != -1 else None


def _permutation(node: fx.Node, rank: int) -> list[int]:
    """Where each output axis of a transpose / permute / t comes from."""
    args = node.args[1:]
    if node.target == "t":
        return list(reversed(range(rank)))
    if node.target in ("transpose", torch.transpose):
        swap = [args[0] if args else node.kwargs.get("dim0"),
                args[1] if len(args) > 1 else node.kwargs.get("dim1")]
        if all(isinstance(d, int) for d in swap):
            dims = list(range(rank))
            dims[swap[0] % rank], dims[swap[1] % rank] = swap[1] % rank, swap[0] % rank
            return dims
        dims = swap
    else:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        dims = dims or node.kwargs.get("dims", ())
    if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
        raise UnsupportedError(f"{_where(node)}: {_op_name(node)} with axes computed at run time; "
                               "structured pruning needs them as constants")
    return [d % rank for d in dims]


def _axis_after_index(index, axis: int, rank: int) -> int | None:
    """Where ``axis`` lands after ``x[index]``: ``None`` adds axes, one ``...``; other axes may
    be sliced or taken at an integer (a ViT's ``x[:, 0]``), the channel axis only as a full
    slice (``:``). None for any index that could select channels."""
    items = list(index) if isinstance(index, tuple) else [index]
    full = slice(None)
    if not all(i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int
               for i in items) or items.count(Ellipsis) > 1:
        return None
    if Ellipsis in items:
        taken = sum(1 for i in items if i is not None and i is not Ellipsis)
        at = items.index(Ellipsis)
        items[at:at + 1] = [full] * (rank - taken)
    out = 0
    dim = 0
    for item in items:
        if item is None:
            out += 1
            continue
        if dim == axis:
            return out if item == full else None
        dim += 1
        out += isinstance(item, slice)  # an integer drops the axis
    return out + axis - dim  # the channel axis is past the index: shifted by the new axes


def _kept_axis(src: tuple[int, ...], out: tuple[int, ...], axis: int) -> int | None:
    """Where channel ``axis`` of ``src`` lands in a reshape to ``out`` that leaves every
    channel's elements in place -- the same size with as many elements before it and after it
    (a window partition (B, H, W, C) -> (B, H/w, w, W/w, w, C) keeps C last) -- or None."""
    before, after = math.prod(src[:axis]), math.prod(src[axis + 1:])
    for j, n in enumerate(out):
        if n == src[axis] and math.prod(out[:j]) == before and math.prod(out[j + 1:]) == after:
            return j
    return None


def _cut(a: _Layout, b: _Layout) -> tuple[int, list[int]] | None:
    """The first space of ``a`` that a segment boundary of ``b`` falls inside, with the sizes of
    the pieces it must be cut into (None when every boundary of ``b`` is one of ``a``'s)."""
    bounds, at = set(), 0
    for seg in b.segs:
        at += seg.size * seg.block
        bounds.add(at)
    start = 0
    for seg in a.segs:
        end = start + seg.size * seg.block
        inner = sorted(p - start for p in bounds if start < p < end)
        if inner and all(p % seg.block == 0 for p in inner):
            edges = [0, *(p // seg.block for p in inner), seg.size]
            return seg.space, [hi - lo for lo, hi in zip(edges, edges[1:], strict=False)]
        start = end
    return None


@dataclass(frozen=True)
class _Const:
    """A value made from one module parameter or buffer (``source``, its get_attr node), maybe
    expanded (a ViT cls token): ``literal`` is, per axis of the value, the size an expand
    hard-coded there (None where kept or computed at run time)."""

    source: fx.Node
    literal: tuple[int | None, ...]
    # per axis of the value, the source's axis it is (None: added); None: the source's axes are
    # the value's last ones (an expand adds leading axes)
    axes: tuple[int | None, ...] | None = None


class _Untied(Exception):
    """Channels cannot be tied into equal groups (the caller pins or refuses)."""


class _Analysis:
    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        # the user's modules: tracing copies their buffers as persistent ones
        self.originals = dict(model.named_modules())
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: list[list[Member]] = []
        self.pins: list[list[str]] = []
        self.layouts: dict[fx.Node, _Layout | _Split | None] = {}
        self.consts: dict[fx.Node, _Const] = {}
        self.bound: dict[tuple[str, str], _Layout] = {}  # (module, role) -> layout (reuse)
        self.split_into: dict[int, list[int]] = {}  # root -> its pieces (or copies)
        self.coarse: dict[int, tuple[int, int]] = {}  # root -> (space, k): k channels as one
        # values whose channels are not followed, with why: computed from parameters / buffers
        # alone (a relative position bias gathered from its table, an attention mask), or from
        # channels kept whole (split into attention heads); where they meet followed channels
        # those are pinned
        self.derived: dict[fx.Node, str] = {}
        # a second followed axis: the features a Linear writes along an axis that is not the
        # channel axis (MLP-Mixer's token mixing), with that Linear's name
        self.side: dict[fx.Node, tuple[_Layout, str]] = {}
        self.side_read: set[tuple[fx.Node, fx.Node]] = set()  # (value, the Linear reading it)

    # -- union-find over channel spaces
    def new_space(self, size: int, pin: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.members.append([])
        self.pins.append([pin] if pin else [])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def split(self, space: int, copies: int) -> None:
        """Tie channel ``c`` and ``c + size/copies`` of a space: it becomes ``copies`` copies of a
        smaller space, and every member already attached is re-expressed per copy."""
        root = self.find(space)
        n = self.size[root] // copies
        new = self.new_space(n)
        self.pins[new] = self.pins[root]
        self.members[new] = [dataclasses.replace(m, offset=m.offset + j * n * m.block)
                             for j in range(copies) for m in self.members[root]]
        self.members[root], self.pins[root] = [], []
        self.split_into[root] = [new] * copies

    def partition(self, space: int, sizes: list[int]) -> None:
        """Cut a space into consecutive, independent pieces of ``sizes`` channels (a concat meets
        one tensor); every member already attached is re-expressed per piece."""
        root = self.find(space)
        pieces, start = [], 0
        for n in sizes:
            new = self.new_space(n)
            self.pins[new] = list(self.pins[root])
            self.members[new] = [dataclasses.replace(m, offset=m.offset + start * m.block)
                                 for m in self.members[root]]
            pieces.append(new)
            start += n
        self.members[root], self.pins[root] = [], []
        self.split_into[root] = pieces

    def resolve(self, layout: _Layout) -> _Layout:
        """``layout`` with every split space replaced by its copies (layouts are stored early)."""
        segs = tuple(seg for s in layout.segs for seg in self._expand(s))
        return layout if segs == layout.segs else _Layout(layout.axis, segs)

    def _expand(self, seg: _Seg) -> tuple[_Seg, ...]:
        root = self.find(seg.space)
        if root in self.coarse:
            new, k = self.coarse[root]
            return self._expand(_Seg(new, self.size[new], seg.block * k))
        if root not in self.split_into:
            return (seg,)
        return tuple(part for piece in self.split_into[root]
                     for part in self._expand(_Seg(piece, self.size[piece], seg.block)))

    def unify(self, a: _Layout, b: _Layout, node: fx.Node) -> None:
        a, b = self.align(a, b)
        shape_a = [(s.size, s.block) for s in a.segs]
        shape_b = [(s.size, s.block) for s in b.segs]
        if shape_a != shape_b:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} joins channel layouts "
                                   f"{shape_a} and {shape_b} that do not line up (e.g. a concat "
                                   "added to one tensor); exclude this part or restructure it")
        for sa, sb in zip(a.segs, b.segs, strict=True):
            ra, rb = self.find(sa.space), self.find(sb.space)
            if ra != rb:
                self.parent[rb] = ra
                self.members[ra] += self.members[rb]
                self.pins[ra] += self.pins[rb]

    def align(self, a: _Layout, b: _Layout) -> tuple[_Layout, _Layout]:
        """Where the two sides cut the channel axis at different places (a concat meets one
        tensor, a grouped conv's tied copies meet an untied shortcut), cut each space at the other
        side's boundaries so both are made of equal pieces. Cutting, not tying: the pieces of a
        plain tensor are independent channels; tied copies on the other side merge them."""
        while True:
            a, b = self.resolve(a), self.resolve(b)
            cut = _cut(a, b) or _cut(b, a)
            if cut is not None:
                self.partition(*cut)
                continue
            coarse = self._coarser(a, b)
            if coarse is None:
                return a, b
            self.coarsen(*coarse)

    def _coarser(self, a: _Layout, b: _Layout) -> tuple[int, int] | None:
        """A space one side holds channel by channel where the other holds runs of ``k`` of its
        channels as one (copies a channel shuffle interleaved): (that space, k), else None."""
        if len(a.segs) != len(b.segs):
            return None
        for sa, sb in zip(a.segs, b.segs, strict=True):
            fine, coarse = sorted((sa, sb), key=lambda s: s.block)
            k = coarse.block // fine.block
            if (k > 1 and coarse.block % fine.block == 0 and fine.size % k == 0
                    and self.find(sa.space) != self.find(sb.space)):
                return fine.space, k
        return None

    def coarsen(self, space: int, k: int) -> None:
        """Tie each run of ``k`` consecutive channels of a space into one channel of a space
        ``k`` times smaller (every member's block grows ``k`` times)."""
        root = self.find(space)
        new = self.new_space(self.size[root] // k)
        self.pins[new] = self.pins[root]
        self.members[new] = [dataclasses.replace(m, block=m.block * k) for m in self.members[root]]
        self.members[root], self.pins[root] = [], []
        self.coarse[root] = (new, k)

    def tie(self, layout: _Layout, groups: int, node: fx.Node) -> _Layout:
        """Cut ``layout`` into ``groups`` equal parts whose channels are tied position by position
        (a grouped conv keeps the same channels in every group); return one part."""
        layout = self.resolve(layout)
        if groups < 1 or layout.width % groups:
            raise _Untied(f"{layout.width} channels do not split into {groups} groups")
        unit = layout.width // groups
        while big := next((s for s in layout.segs if s.size * s.block > unit), None):
            copies = big.size * big.block // unit
            if big.size * big.block % unit or big.size % copies:
                raise _Untied(f"{big.size} channels (x{big.block}) do not split into "
                              f"{unit}-wide groups")
            self.split(big.space, copies)
            layout = self.resolve(layout)
        chunks, part, width = [], [], 0
        for seg in layout.segs:
            part.append(seg)
            width += seg.size * seg.block
            if width > unit:
                raise _Untied("concatenated tensors straddle the group boundaries")
            if width == unit:
                chunks.append(_Layout(layout.axis, tuple(part)))
                part, width = [], 0
        for chunk in chunks[1:]:
            try:  # aligning cuts or coarsens spaces where the groups' tensors differ in size
                self.unify(chunks[0], chunk, node)
            except UnsupportedError:
                raise _Untied("the groups are made of differently sized concatenated "
                              "tensors") from None
        return self.resolve(chunks[0])

    def pin(self, layout: _Layout, reason: str) -> None:
        for seg in self.resolve(layout).segs:
            self.pins[self.find(seg.space)].append(reason)

    def attach(self, layout: _Layout, module: str, kind: str, transposed: bool = False) -> None:
        """Add ``module``'s axis as a member of every space in ``layout``, at its offset."""
        offset = 0
        for seg in self.resolve(layout).segs:
            self.members[self.find(seg.space)].append(
                Member(module, kind, offset, seg.block, transposed))
            offset += seg.size * seg.block

    def bind(self, module: str, role: str, layout: _Layout, node: fx.Node) -> _Layout:
        """A module called twice shares weights: its layouts must be the same spaces."""
        key = (module, role)
        if key in self.bound:
            self.unify(self.bound[key], layout, node)
            return self.resolve(self.bound[key])
        self.bound[key] = layout
        return layout

    # -- walking the graph
    def run(self) -> list[Group]:
        for node in self.gm.graph.nodes:
            self.layouts[node] = self.visit(node)
            self._follow_side(node)
        roots: dict[int, Group] = {}
        for s in range(len(self.parent)):
            r = self.find(s)
            if r not in roots and r not in self.split_into and r not in self.coarse:
                pins = list(dict.fromkeys(self.pins[r]))
                roots[r] = Group(self.size[r], list(dict.fromkeys(self.members[r])), pins)
        return list(roots.values())

    def visit(self, node: fx.Node) -> _Layout | _Split | None:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape is None or len(shape) < 2:
                return None
            return _Layout(1, (_Seg(self.new_space(shape[1], "model input"), shape[1]),))
        if node.op == "get_attr":
            self.consts[node] = _Const(node, (None,) * len(_shape(node) or ()))
            return None
        if node.op == "output":
            for arg in node.all_input_nodes:
                layout = self.layouts.get(arg)
                for one in layout if isinstance(layout, tuple) else (layout,):
                    if one is not None:
                        self.pin(one.layout if isinstance(one, _Split) else one, "model output")
            return None
        if node.op in ("call_function", "call_method") and self._const_view(node):
            return None
        if node.op in ("call_function", "call_method") and self._from_constants(node):
            return None
        if node.op == "call_module":
            kind = _module_kind(self.modules[node.target])
            if kind is None:
                return self._leaf(node)  # probed: channels pass through, or refused
        elif _shape(node) is None and not any(self.layouts.get(a) is not None or a in self.consts
                                              for a in node.all_input_nodes):
            return None  # Python arithmetic on sizes (c // 2): no tensor, no channels
        elif node.op == "call_function":
            kind = FUNCTION_KINDS.get(node.target)
        else:
            kind = METHOD_KINDS.get(node.target)
        if kind is None:
            return self._leaf(node)  # a torch.fx.wrap'd function, an unknown op: probed
        if kind == "refuse":
            raise UnsupportedError(f"{_where(node)}: operation {_op_name(node)} moves or selects "
                                   "channels; structured pruning cannot follow it (use "
                                   "prune.magnitude instead)")
        if kind not in ("reshape", "permute", "same", "meta") and any(
                isinstance(self.layouts.get(a), _Split) for a in node.all_input_nodes):
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} works on a channel axis "
                                   "split in two; only a channel shuffle (view -> transpose -> "
                                   "view back) is understood there")
        return getattr(self, f"_{kind}")(node)

    def _input(self, node: fx.Node, arg=None) -> _Layout:
        src = node.args[0] if arg is None else arg
        layout = self.layouts.get(src) if isinstance(src, fx.Node) else None
        if isinstance(layout, tuple):
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} takes the several outputs "
                                   "of one call at once; structured pruning follows them only "
                                   "when indexed (out[0])")
        if layout is None and src in self.derived:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} gets values "
                                   f"{self.derived[src]}, whose channels are not followed; "
                                   "structured pruning cannot follow it")
        if layout is None:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} gets an input whose "
                                   "channels cannot be followed (a constant or parameter)")
        return self.resolve(layout)

    def _check_axis(self, node: fx.Node, layout: _Layout, axis: int, what: str) -> None:
        if layout.axis != axis:
            raise UnsupportedError(f"{_where(node)}: {what} expects channels on axis {axis} but "
                                   f"they are on axis {layout.axis}; structured pruning cannot "
                                   "follow this layout")

    # -- kinds
    def _conv(self, node: fx.Node, transposed: bool = False) -> _Layout:
        """Groups=1 and depthwise as usual. A conv with g groups ties its inputs (and outputs)
        into g copies: every group keeps the same channels, so it stays a g-group conv.

        A transposed conv is the mirror image: its weight is (in, out/groups, k...), so axis 0
        holds every group's inputs and axis 1 the out/g outputs all groups share (members say
        ``transposed``; the bias holds g copies). Stride, padding and output_padding only change
        the spatial size; a depthwise one (weight (C, 1, k...)) passes through like a conv."""
        name, conv = node.target, self.modules[node.target]
        x = self._input(node)
        self._check_axis(node, x, 1, "a transposed convolution" if transposed else "a convolution")
        first_call = (name, "in") not in self.bound
        x = self.bind(name, "in", x, node)
        g = conv.groups
        if g > 1 and g == conv.in_channels == conv.out_channels:  # depthwise: passes through
            if first_call:
                self.attach(x, name, "depthwise")
            return x
        try:
            unit = self.tie(x, g, node)
        except _Untied as why:
            kind = "grouped transposed conv" if transposed else "grouped conv"
            reason = f"{kind} {name!r} (groups={g}) is kept whole: {why}"
            self.pin(x, reason)
            out = self.bind(name, "out", _Layout(
                1, (_Seg(self.new_space(conv.out_channels, reason), conv.out_channels),)), node)
            if first_call and not transposed:
                self.attach(out, name, "out")
            return out
        n = conv.out_channels // g
        out = self.bind(name, "out", _Layout(1, (_Seg(self.new_space(n), n),) * g), node)
        if first_call and transposed:
            self.attach(x, name, "in", transposed=True)
            self.attach(_Layout(1, out.segs[:1]), name, "out", transposed=True)
        elif first_call:
            self.attach(unit, name, "in")
            self.attach(out, name, "out")
        return out

    def _convt(self, node: fx.Node) -> _Layout:
        return self._conv(node, transposed=True)

    def _linear(self, node: fx.Node) -> _Layout:
        name, linear = node.target, self.modules[node.target]
        rank = len(_shape(node))
        if node.args[0] in self.derived:  # reads heads back (an attention's out projection)
            why = f"module {name!r} reads values {self.derived[node.args[0]]}"
            width = linear.in_features
            x = _Layout(rank - 1, (_Seg(self.new_space(width, why), width),))
        else:
            x = self._input(node)
        if x.axis != rank - 1:
            if not all("model input" in self.pins[self.find(seg.space)] for seg in x.segs):
                return self._across(node, x)
            # a (B, T, F) model input read by a Linear: its features are the last axis (the
            # input's channels are never pruned, whichever axis holds them)
            x = _Layout(rank - 1, (_Seg(self.new_space(linear.in_features, "model input"),
                                        linear.in_features),))
        self._check_axis(node, x, rank - 1, "a Linear layer")
        first_call = (name, "out") not in self.bound
        x = self.bind(name, "in", x, node)
        out = self.bind(name, "out", _Layout(
            rank - 1, (_Seg(self.new_space(linear.out_features), linear.out_features),)), node)
        if first_call:
            self.attach(x, name, "in")
            self.attach(out, name, "out")
        return out

    def _norm(self, node: fx.Node, axis: int) -> _Layout:
        name, module = node.target, self.modules[node.target]
        x = self._input(node)
        self._check_axis(node, x, axis, type(module).__name__)
        first_call = (name, "in") not in self.bound
        x = self.bind(name, "in", x, node)
        if first_call:
            self.attach(x, name, "norm")
        return x

    def _batchnorm(self, node: fx.Node) -> _Layout:
        return self._norm(node, 1)  # per channel: blocks (after a shuffle) are fine

    def _layernorm(self, node: fx.Node) -> _Layout:
        module = self.modules[node.target]
        rank = len(_shape(node))
        if len(module.normalized_shape) != 1:
            raise UnsupportedError(f"module {node.target!r}: LayerNorm over "
                                   f"{tuple(module.normalized_shape)} mixes channels with other "
                                   "axes; normalize over the feature axis only")
        if any(seg.block != 1 for seg in self._input(node).segs):
            raise UnsupportedError(f"module {node.target!r}: normalization over flattened "
                                   "channels")
        return self._norm(node, rank - 1)

    def _groupnorm(self, node: fx.Node) -> _Layout:
        x = self._input(node)
        self.pin(x, f"GroupNorm {node.target!r} is kept whole")
        return x

    def _same(self, node: fx.Node) -> _Layout | _Split:
        src, out = _shape(node.args[0]), _shape(node)
        split = self.layouts.get(node.args[0])
        if isinstance(split, _Split):
            if out != src:
                raise UnsupportedError(f"{_where(node)}: {_op_name(node)} changes the shape of a "
                                       "channel axis split in two; structured pruning cannot "
                                       "follow it")
            return split
        x = self._input(node)
        if out is None or len(out) != len(src) or out[x.axis] != src[x.axis]:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} changes the channel axis "
                                   f"({src} -> {out}); structured pruning cannot follow it")
        return x

    def _elementwise(self, node: fx.Node) -> _Layout | None:
        out = _shape(node)
        if out is None:
            return None
        result: _Layout | None = None
        stored: list[fx.Node] = []
        derived: list[fx.Node] = []
        for arg in node.args:
            if not isinstance(arg, fx.Node):
                continue
            shape = _shape(arg)
            if shape is None or len(shape) == 0:
                continue
            lead = len(out) - len(shape)
            layout = self.layouts.get(arg)
            if layout is None:
                if arg in self.consts and any(d > 1 for d in shape):
                    stored.append(arg)
                elif arg in self.derived:
                    derived.append(arg)
                continue
            layout = self.resolve(layout)
            axis = layout.axis + lead
            if shape[layout.axis] == 1 and out[axis] != 1:
                continue  # broadcast along the channel axis: no coupling
            if result is None:
                result = _Layout(axis, layout.segs)
            elif result.axis != axis:
                raise UnsupportedError(f"{_where(node)}: {_op_name(node)} combines tensors with "
                                       f"channels on different axes ({result.axis} vs {axis})")
            else:
                self.unify(result, layout, node)
        if result is None:  # only broadcast operands: channels follow the first tensor operand
            first = next((a for a in node.args if isinstance(a, fx.Node)
                          and self.layouts.get(a) is not None), None)
            result = self.layouts.get(first) if first is not None else None
        if result is not None:
            for arg in stored:
                self._stored(node, arg, self.resolve(result))
            for arg in derived:
                self._derived_meets(node, arg, self.resolve(result))
        return self.resolve(result) if result is not None else None

    def _stored(self, node: fx.Node, arg: fx.Node, layout: _Layout) -> None:
        """A parameter or buffer combined per channel (a layer scale, a positional embedding, a
        cls token concatenated along another axis) is sliced with the channels: it joins the
        group as member ``param:NAME:DIM`` of its owner. ``arg`` may be it expanded."""
        const = self.consts[arg]
        at = layout.axis - (len(_shape(node)) - len(_shape(arg)))  # the channel axis in arg
        if at < 0:
            return  # broadcast along the channel axis: no coupling
        if const.literal[at] is not None:
            self.pin(layout, f"{_where(arg)}: {_op_name(arg)} hard-codes "
                             f"{const.literal[at]} channels")
            return
        arg = const.source
        shape = _shape(arg)
        dim = (at - (len(const.literal) - len(shape)) if const.axes is None
               else const.axes[at] if const.axes[at] is not None else -1)
        if dim < 0 or shape[dim] == 1:
            return  # broadcast along the channel axis: no coupling
        owner, _, name = arg.target.rpartition(".")
        module = self.originals.get(owner)
        if module is None or not (name in module._parameters or name in module._buffers):
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} with a constant of shape "
                                   f"{shape} that is not a parameter or buffer of a module; "
                                   "structured pruning cannot slice it (register it with "
                                   "nn.Parameter or register_buffer)")
        if shape[dim] != layout.width:
            raise UnsupportedError(f"{_where(node)}: {arg.target!r} has {shape[dim]} channels "
                                   f"where the tensor it meets has {layout.width}; a parameter "
                                   "that widens the channel axis is not followed")
        if name in module._non_persistent_buffers_set:
            # not in the state_dict: a sliced copy could not be saved, the reload would be wrong
            self.pin(layout, f"{_where(node)}: {arg.target!r} is a non-persistent buffer "
                             "(register_buffer(..., persistent=False)); make it persistent to "
                             "prune these channels")
            return
        if any(seg.block != 1 for seg in layout.segs):
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} with {arg.target!r} over "
                                   "flattened channels; structured pruning cannot slice it")
        kind = f"param:{name}:{dim}"
        if (owner, kind) not in self.bound:
            self.bound[(owner, kind)] = layout
            self.attach(layout, owner, kind)
        else:
            self.bind(owner, kind, layout, node)

    def _cat(self, node: fx.Node) -> _Layout:
        """Along the channel axis spaces sit side by side; along another axis the tensors share
        channels, and a parameter among them (a ViT cls token) is sliced with them."""
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        followed = [t for t in tensors if self.layouts.get(t) is not None]
        stored = [t for t in tensors if t not in followed and t in self.consts]
        if not followed or len(followed) + len(stored) < len(tensors):
            self._input(node, next((t for t in tensors if t not in followed and t not in stored),
                                   tensors[0]))  # raises: channels that cannot be followed
        layouts = [self._input(node, t) for t in followed]
        rank = len(_shape(node))
        dim = dim % rank
        if all(lay.axis == dim for lay in layouts):
            if stored:
                raise UnsupportedError(f"{_where(node)}: torch.cat adds the channels of "
                                       f"{self.consts[stored[0]].source.target!r} (a parameter "
                                       "or buffer) to followed channels; structured pruning "
                                       "cannot follow it")
            return _Layout(dim, tuple(seg for lay in layouts for seg in lay.segs))
        for lay in layouts[1:]:
            self._check_axis(node, lay, layouts[0].axis, "torch.cat")
            self.unify(layouts[0], lay, node)
        for arg in stored:
            self._stored(node, arg, self.resolve(layouts[0]))
        return self.resolve(layouts[0])

    def _broadcast(self, node: fx.Node) -> _Layout | None:
        """``expand`` / ``expand_as``: new leading axes, size-1 axes widened. The channel axis
        must keep its size (-1, computed, or ``expand_as`` a tensor with the same channels, which
        joins the group); a size written into the forward pins the channels. Expanding a
        parameter (a ViT cls token) leaves a constant that joins a group where it meets channels
        (a cat along another axis, an add)."""
        src, other = node.args[0], None
        out, shape = _shape(node), _shape(src)
        lead = len(out) - len(shape)
        if node.target == "expand":
            sizes = node.args[1:] or (node.kwargs.get("size"),)
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            if len(sizes) != len(out):  # x.expand(y.shape): computed at run time
                sizes = [None] * len(out)
        else:
            other, sizes = node.args[1], [None] * len(out)
        kept = [i >= lead and (sizes[i] == -1 or other is not None) for i in range(len(out))]
        literal = [s if type(s) is int and s != -1 else None for s in sizes]
        into = self.layouts.get(other) if isinstance(other, fx.Node) else None
        into = self.resolve(into) if isinstance(into, _Layout) else None
        if src in self.consts and self.layouts.get(src) is None:
            const = self.consts[src]
            self.consts[node] = _Const(const.source, tuple(
                const.literal[i - lead] if kept[i] else literal[i] for i in range(len(out))),
                None if const.axes is None else (None,) * lead + const.axes)
            if into is None:
                return None
            self._stored(node, node, into)  # cls.expand_as(x): the parameter takes x's channels
            return into
        x = self._input(node)
        a = x.axis + lead
        if out[a] != shape[x.axis]:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} changes the channel axis "
                                   f"({shape} -> {out}); structured pruning can follow an expand "
                                   "only where the channel axis keeps its size")
        if literal[a] is not None:
            self.pin(x, f"{_where(node)}: {_op_name(node)} hard-codes {literal[a]} channels")
        result = _Layout(a, x.segs)
        if into is not None:  # the output takes other's shape: its channels are these
            self._check_axis(node, into, a, _op_name(node))
            self.unify(result, into, node)
        elif other in self.consts:
            self._stored(node, other, result)
        elif other is not None:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} takes its shape from a "
                                   "tensor whose channels cannot be followed")
        return self.resolve(result)

    def _reshape(self, node: fx.Node) -> _Layout | _Split:
        """Keep, flatten, split in two (a shuffle begins) or merge back (a shuffle ends)."""
        split = self.layouts.get(node.args[0])
        if isinstance(split, _Split):
            return self._merge(node, split)
        x = self._input(node)
        src, out = _shape(node.args[0]), _shape(node)
        a = x.axis
        moved = _kept_axis(src, out, a)  # a window partition / reverse keeps C where it is
        keeps = moved is not None
        if keeps:
            x, a = _Layout(moved, x.segs), moved
        if not keeps and len(out) == len(src) + 1 and out[:a] == src[:a] \
                and out[a + 2:] == src[a + 1:] and out[a] * out[a + 1] == src[a]:
            self._refuse_literal(node, a + 1, "channels per group")
            return _Split(x, out[a])  # (N, C, ...) -> (N, g, C/g, ...)
        if not keeps and len(out) == a + 1 and out[:a] == src[:a] \
                and out[a] == math.prod(src[a:]):
            k = math.prod(src[a + 1:])  # flatten: every channel becomes k features
            x = _Layout(a, tuple(_Seg(s.space, s.size, s.block * k) for s in x.segs))
        elif not keeps and a == len(src) - 1 and len(out) > len(src) + 1 \
                and out[:a] == src[:a] and math.prod(out[a:]) == src[a]:
            return self._into_heads(node, x)  # a fused qkv: (B, N, 3 * E) -> (B, N, 3, h, d)
        elif not keeps and len(out) > 1 and all(
                "model input" in self.pins[self.find(seg.space)] for seg in x.segs):
            # the model input reshaped (image rows as tokens): never pruned, on axis 1 again
            return _Layout(1, (_Seg(self.new_space(out[1], "model input"), out[1]),))
        elif not keeps:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} reshapes {src} -> {out} "
                                   "and moves the channel axis; structured pruning cannot "
                                   "follow it")
        size = _literal_size(node, a)
        if size is not None:
            self.pin(x, f"{_where(node)}: {_op_name(node)} hard-codes {size} channels")
        return x

    def _merge(self, node: fx.Node, split: _Split) -> _Layout:
        src, out = _shape(node.args[0]), _shape(node)
        a = split.layout.axis
        if not (len(out) == len(src) - 1 and out[:a] == src[:a] and out[a + 1:] == src[a + 2:]
                and out[a] == src[a] * src[a + 1]):
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} reshapes a channel axis "
                                   f"split in two ({src} -> {out}); only merging it back (the "
                                   "end of a channel shuffle) is understood")
        self._refuse_literal(node, a, "channels")
        if not split.swapped:
            return self.resolve(split.layout)
        try:  # out channel i*g + j was channel j*C/g + i: part channel i, j-th of a block of g
            part = self.tie(split.layout, split.groups, node)
        except _Untied as why:
            raise UnsupportedError(f"{_where(node)}: the channel shuffle ending in "
                                   f"{_op_name(node)} cannot be followed ({why})") from None
        return _Layout(a, tuple(_Seg(s.space, s.size, s.block * split.groups)
                                for s in part.segs))

    def _refuse_literal(self, node: fx.Node, axis: int, what: str) -> None:
        size = _literal_size(node, axis)
        if size is not None:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} hard-codes {size} {what}, "
                                   "which pruning changes; compute it from x.size(1) (or pass "
                                   "-1) in the model's forward")

    def _permute(self, node: fx.Node) -> _Layout | _Split:
        """The channel axis moves; swapping the halves of a split channel axis is a shuffle."""
        perm = _permutation(node, len(_shape(node.args[0])))
        split = self.layouts.get(node.args[0])
        if isinstance(split, _Split):
            a = split.layout.axis
            swap = list(range(len(perm)))
            swap[a], swap[a + 1] = a + 1, a
            if perm != swap and a + 2 == len(perm):  # attention heads: view(b, t, h, d).transpose
                return self._into_heads(node, split.layout)
            if perm != swap:
                raise UnsupportedError(f"{_where(node)}: {_op_name(node)} moves a channel axis "
                                       "split in two other than by swapping its halves (a "
                                       "channel shuffle); structured pruning cannot follow it")
            return _Split(split.layout, split.groups, not split.swapped)
        x = self._input(node)
        return _Layout(perm.index(x.axis), x.segs)

    def _shuffle(self, node: fx.Node) -> _Layout:
        x = self._input(node)
        self._check_axis(node, x, 1, "a channel shuffle")
        groups = self.modules[node.target].groups
        try:
            part = self.tie(x, groups, node)
        except _Untied as why:
            raise UnsupportedError(f"module {node.target!r}: channel shuffle cannot be followed "
                                   f"({why})") from None
        return _Layout(1, tuple(_Seg(s.space, s.size, s.block * groups) for s in part.segs))

    def _reduce(self, node: fx.Node) -> _Layout:
        x = self._input(node)
        rank = len(_shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        spread = node.target in ("var", "std", torch.var, torch.std)  # (dim, unbiased, keepdim)
        at = 3 if spread else 2
        keepdim = node.args[at] if len(node.args) > at else node.kwargs.get("keepdim", False)
        dims = [dims] if isinstance(dims, int) else dims
        if dims is not None and x.axis in {d % rank for d in dims} and keepdim \
                and node.target in ("mean", torch.mean) + ("var", "std", torch.var, torch.std):
            return self._statistic(node, x)
        if dims is None or x.axis in {d % rank for d in dims}:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} reduces over the channel "
                                   "axis; structured pruning would change its result")
        before = sum(1 for d in dims if d % rank < x.axis)
        return _Layout(x.axis if keepdim else x.axis - before, x.segs)

    def _meta(self, node: fx.Node) -> None:
        return None

    def _getitem(self, node: fx.Node) -> _Layout | None:
        """Indexing that only adds axes (``s[:, :, None, None]``, an SE gate) moves the channel
        axis; any other indexing of a followed tensor may select channels and is refused."""
        src = node.args[0]
        items = self.layouts.get(src) if isinstance(src, fx.Node) else None
        if isinstance(items, tuple):  # one output of a call returning several (attention)
            index = node.args[1]
            if type(index) is not int or not -len(items) <= index < len(items):
                raise UnsupportedError(f"{_where(node)}: {_op_name(node)} takes {index!r} of a "
                                       "call's outputs; structured pruning follows one output "
                                       "at a time (out[0])")
            return items[index]
        if isinstance(src, fx.Node) and self.layouts.get(src) is not None:
            x = self._input(node)
            axis = _axis_after_index(node.args[1], x.axis, len(_shape(src)))
            if axis is None:
                raise UnsupportedError(f"{_where(node)}: indexing a tensor ({_op_name(node)}) "
                                       "may select channels; structured pruning cannot follow "
                                       "it")
            return _Layout(axis, x.segs)
        return None

    # -- transformer families: attention, shifted windows, token mixing, constant-only values
    def _attention(self, node: fx.Node) -> tuple[_Layout, None]:
        """``nn.MultiheadAttention`` (or its pruned form) as one call: query, key and value share
        the embedding channels (``in_proj_weight``'s columns; last axis, batch first or not);
        the output's channels are ``out_proj``'s rows. Prune its heads with prune.heads."""
        name, mha = node.target, self.modules[node.target]
        args = [node.args[i] if i < len(node.args) else node.kwargs.get(key)
                for i, key in enumerate(("query", "key", "value"))]
        xs = [self._input(node, arg) for arg in args]
        rank = len(_shape(args[0]))
        for x in xs:
            self._check_axis(node, x, rank - 1, type(mha).__name__)
        width = mha.out_proj.out_features
        if (isinstance(mha, nn.MultiheadAttention) and not mha._qkv_same_embed_dim) or \
                getattr(mha, "bias_k", None) is not None or getattr(mha, "add_zero_attn", False):
            why = (f"module {name!r}: {type(mha).__name__} with kdim/vdim, add_bias_kv or "
                   "add_zero_attn is kept whole")
            for x in xs:
                self.pin(x, why)
            return _Layout(rank - 1, (_Seg(self.new_space(width, why), width),)), None
        for x in xs[1:]:
            self.unify(xs[0], x, node)
        first_call = (name, "in") not in self.bound
        x = self.bind(name, "in", self.resolve(xs[0]), node)
        out = self.bind(name, "out", _Layout(rank - 1, (_Seg(self.new_space(width), width),)),
                        node)
        if first_call:
            if any(seg.block != 1 for seg in x.segs):
                raise UnsupportedError(f"module {name!r}: attention over flattened channels; "
                                       "structured pruning cannot slice it")
            self.attach(x, name, "param:in_proj_weight:1")
            self.attach(out, f"{name}.out_proj", "out")
        return self.resolve(out), None

    def _roll(self, node: fx.Node) -> _Layout:
        """``torch.roll`` along other axes (Swin's shifted windows) keeps every channel."""
        x = self._input(node)
        rank = len(_shape(node))
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
        dims = [dims] if isinstance(dims, int) else dims
        if not dims or not all(isinstance(d, int) for d in dims) \
                or x.axis in {d % rank for d in dims}:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} rolls the channel axis (or "
                                   "a flattened tensor, or axes computed at run time); structured "
                                   "pruning cannot follow it (use prune.magnitude instead)")
        return x

    def _from_constants(self, node: fx.Node) -> bool:
        """Whether ``node`` is computed from parameters and buffers alone (a relative position
        bias gathered from its table, a window attention mask); it is then recorded in
        :attr:`derived` and no channels flow through it. A parameter that is only expanded
        keeps its own tracking (a cls token joins a channel group where it meets channels)."""
        inputs = node.all_input_nodes
        if _shape(node) is None or not inputs \
                or any(self.layouts.get(a) is not None for a in inputs) \
                or not any(a in self.consts or a in self.derived for a in inputs):
            return False
        kinds = FUNCTION_KINDS if node.op == "call_function" else METHOD_KINDS
        kind = kinds.get(node.target)
        if kind == "meta" or (kind == "broadcast" and node.args[0] in self.consts):
            return False
        self.derived[node] = next((self.derived[a] for a in inputs if a in self.derived),
                                  "computed from parameters or buffers")
        return True

    def _into_heads(self, node: fx.Node, x: _Layout) -> None:
        """The channel axis split into attention heads and moved (``view(b, t, h, d)
        .transpose(1, 2)``, a fused ``qkv.reshape(b, n, 3, h, d).permute(...)``): those channels
        (q/k/v's outputs) are kept whole and not followed further; the projection reading the
        heads back gets a pinned input. The embedding channels around stay prunable."""
        why = f"split into attention heads at {_where(node)}"
        self.pin(x, f"{why} (kept whole; remove heads with prune.heads)")
        self.derived[node] = f"from channels {why}"

    def _derived_meets(self, node: fx.Node, arg: fx.Node, layout: _Layout) -> None:
        """A value whose channels are not followed (see :attr:`derived`) meets followed
        channels: where it varies along the channel axis, those channels must stay."""
        shape, out = _shape(arg), _shape(node)
        at = layout.axis - (len(out) - len(shape))
        if at >= 0 and shape[at] > 1:
            self.pin(layout, f"{_where(node)}: {_op_name(node)} combines these channels with "
                             f"{arg.name!r} ({self.derived[arg]}), which structured pruning "
                             "cannot slice (combine the parameter itself, or add the layers "
                             "making these channels to ignore:)")

    def _across(self, node: fx.Node, x: _Layout) -> _Layout:
        """A Linear applied along an axis that is not the channel axis (MLP-Mixer's token
        mixing: ``x.transpose(1, 2)`` -> ``Linear(tokens, hidden)`` -> ``Linear(hidden,
        tokens)``): the channels pass through on their axis; the features it writes on the last
        axis are a *side* space, followed through activations into the next Linear, which
        reads them (its input columns). What it reads is tokens (never pruned) unless it is
        such a side space; a side space used any other way is pinned (the token count)."""
        name, linear = node.target, self.modules[node.target]
        rank = len(_shape(node))
        first_call = (name, "out") not in self.bound
        side = self.side.get(node.args[0])
        if side is not None and side[0].axis == rank - 1:
            self.side_read.add((node.args[0], node))
            inner = self.bind(name, "in", side[0], node)
            if first_call:
                self.attach(inner, name, "in")
        out = self.bind(name, "out", _Layout(
            rank - 1, (_Seg(self.new_space(linear.out_features), linear.out_features),)), node)
        if first_call:
            self.attach(out, name, "out")
        self.side[node] = (self.resolve(out), name)
        return _Layout(x.axis, x.segs)

    def _follow_side(self, node: fx.Node) -> None:
        """Carry side spaces (see :meth:`_across`) through shape-keeping activations; pin them
        wherever else they go."""
        for arg in node.all_input_nodes:
            side = self.side.get(arg)
            if side is None or (arg, node) in self.side_read or self.side.get(node) is side:
                continue
            if node.op == "call_module":
                kind = _module_kind(self.modules[node.target])
            else:
                kinds = FUNCTION_KINDS if node.op == "call_function" else METHOD_KINDS
                kind = kinds.get(node.target)
            if kind == "same" and _shape(node) == _shape(arg) and node not in self.side:
                self.side[node] = side
                continue
            self.pin(side[0], f"the features {side[1]!r} writes along a non-channel axis (token "
                              f"mixing) go to {_where(node)} ({_op_name(node)}); they are "
                              "followed only through activations into a Linear that reads them")

    # -- CNN families: channel splits, normalization written out, calls kept whole by the tracer
    def _chunk(self, node: fx.Node) -> tuple[_Layout, ...]:
        """``chunk`` / ``split`` (ShuffleNetV2's ``x1, x2 = x.chunk(2, dim=1)``). Along another
        axis every part keeps the channels. Along the channel axis the parts are cut from the
        run-time width: ``chunk(n)`` or ``split(C // n)`` must cut a pruned tensor at the same
        place, so the n parts are tied (they keep the same channels, as a grouped conv's
        groups); sizes written into the forward (``split([4, 12])``) pin the parts whole."""
        x = self._input(node)
        rank = len(_shape(node.args[0]))
        meta = node.meta.get("tensor_meta")
        shapes = [tuple(m.shape) for m in meta] if isinstance(meta, (tuple, list)) else []
        if not shapes or any(len(s) != rank for s in shapes):
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} without tensor shapes; "
                                   "structured pruning cannot follow it")
        chunk = node.target in ("chunk", torch.chunk)
        how = node.args[1] if len(node.args) > 1 else next(
            (node.kwargs[k] for k in ("chunks", "split_size_or_sections", "split_size")
             if k in node.kwargs), None)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim % rank != x.axis:
            return tuple(x for _ in shapes)
        sizes = [s[x.axis] for s in shapes]
        equal = len(set(sizes)) == 1 and len(sizes) > 1 and (
            (chunk and how == len(sizes)) or _counts_channels(how, node.args[0], x.axis, rank)
            == len(sizes))
        if equal:
            try:
                part = self.tie(x, len(sizes), node)
                return tuple(part for _ in sizes)
            except _Untied as why:
                reason = (f"{_where(node)}: {_op_name(node)} cuts {x.width} channels into "
                          f"{len(sizes)} parts that pruning cannot keep alike ({why})")
        elif isinstance(how, fx.Node) or (isinstance(how, (list, tuple)) and any(
                isinstance(h, fx.Node) for h in how)):
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} cuts the channel axis at "
                                   "sizes computed at run time; structured pruning follows "
                                   "chunk(n) and split(x.size(1) // n) (or keeps sizes written "
                                   "as numbers whole)")
        else:
            reason = (f"{_where(node)}: {_op_name(node)} cuts the channels at sizes {sizes} "
                      "that pruning would move (written into the forward, or unequal chunks)")
        return self._pieces(x, sizes, reason)

    def _pieces(self, x: _Layout, sizes: list[int], reason: str) -> tuple[_Layout, ...]:
        """``x`` cut at ``sizes``, kept whole: ``x`` is pinned and each part is a new pinned
        space (a cut may fall inside a run of channels kept as one, a shuffled block)."""
        self.pin(x, reason)
        return tuple(_Layout(x.axis, (_Seg(self.new_space(n, reason), n),)) for n in sizes)

    def _statistic(self, node: fx.Node, x: _Layout) -> _Layout:
        """A mean (var, std) over the channel axis kept as a size-1 axis: a normalization
        statistic broadcast back over the channels (ConvNeXt's channels-first LayerNorm). As
        with nn.LayerNorm, pruning changes it only by averaging over fewer channels."""
        why = f"{_where(node)}: {_op_name(node)} over the channel axis (one value)"
        return _Layout(x.axis, (_Seg(self.new_space(1, why), 1),))

    def _fresh(self, node: fx.Node) -> _Layout:
        """``x.new_empty(shape)`` and kin: a drop-path mask (channel axis 1), or a tensor shaped
        like ``x`` (its channels); any other shape is refused."""
        x = self._input(node)
        src, out = _shape(node.args[0]), _shape(node)
        if out is not None and len(out) == len(src) and out[x.axis] == 1:
            return _Layout(x.axis, (_Seg(self.new_space(1, f"{_where(node)}: a new tensor"), 1),))
        if out != src:
            raise UnsupportedError(f"{_where(node)}: {_op_name(node)} makes a {out} tensor from "
                                   f"a {src} one whose channels are on axis {x.axis}; structured "
                                   "pruning cannot tell whether its size follows them")
        size = _literal_size(node, x.axis)
        if size is not None:
            self.pin(x, f"{_where(node)}: {_op_name(node)} hard-codes {size} channels")
        return x

    def _layer_norm(self, node: fx.Node) -> _Layout:
        """``F.layer_norm`` over the channel axis (a LayerNorm2d: permute, F.layer_norm,
        permute back). An ``nn.LayerNorm`` subclass's own weight joins as its ``norm`` member
        (its ``normalized_shape`` is updated); another module's weight and bias as parameters,
        where the normalized shape is computed (``x.shape[-1:]``), not written as a number."""
        x = self._input(node)
        rank = len(_shape(node))
        self._check_axis(node, x, rank - 1, "layer_norm")
        if any(seg.block != 1 for seg in x.segs):
            raise UnsupportedError(f"{_where(node)}: layer_norm over flattened channels")
        args = [node.args[i] if i < len(node.args) else node.kwargs.get(k)
                for i, k in enumerate(("input", "normalized_shape", "weight", "bias"))]
        shape, stored = args[1], [a for a in args[2:] if isinstance(a, fx.Node)]
        literal = isinstance(shape, (tuple, list)) and all(type(d) is int for d in shape)
        if literal and len(shape) != 1:
            raise UnsupportedError(f"{_where(node)}: layer_norm over {tuple(shape)} mixes "
                                   "channels with other axes; normalize over the channel axis "
                                   "only")
        if any(a not in self.consts for a in stored):
            raise UnsupportedError(f"{_where(node)}: layer_norm with a computed weight or bias; "
                                   "structured pruning cannot slice it")
        owners = {self.consts[a].source.target.rpartition(".") for a in stored}
        owner = next(iter(owners))[0] if len(owners) == len(stored) > 0 else None
        module = self.originals.get(owner) if owner is not None else None
        if module is not None and _module_kind(module) == "layernorm" and all(
                self.consts[a].source.target.endswith((".weight", ".bias")) for a in stored):
            first_call = (owner, "in") not in self.bound
            x = self.bind(owner, "in", x, node)
            if first_call:
                self.attach(x, owner, "norm")
            return x
        if literal:
            self.pin(x, f"{_where(node)}: layer_norm hard-codes normalized_shape "
                        f"{tuple(shape)}; pass x.shape[-1:] to prune these channels")
        for arg in stored:
            self._stored(node, arg, x)
        return self.resolve(x)

    def _const_view(self, node: fx.Node) -> bool:
        """A parameter indexed with ``None`` / ``:`` (``w[:, None, None]``), viewed or unsqueezed
        with size-1 axes only (``gamma.view(1, -1, 1, 1)``) stays that parameter: where it meets
        channels it is sliced with them. Records it and says whether it did."""
        if node.target not in (operator.getitem, "view", "reshape", "unsqueeze", torch.reshape):
            return False
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src not in self.consts or self.layouts.get(src):
            return False
        const, shape, out = self.consts[src], _shape(src), _shape(node)
        if shape is None or out is None:
            return False
        if node.target is operator.getitem:
            axes, literal = _index_axes(node.args[1], len(shape)), [None] * len(out)
        else:
            axes = _view_axes(shape, out)
            literal = [None if node.target == "unsqueeze" or out[i] == 1
                       else _literal_size(node, i) for i in range(len(out))]
        if axes is None or len(axes) != len(out):
            return False
        base = _source_axes(const, len(_shape(const.source)))
        self.consts[node] = _Const(const.source, tuple(
            lit if lit is not None else None if a is None else const.literal[a]
            for a, lit in zip(axes, literal, strict=True)),
            tuple(None if a is None else base[a] for a in axes))
        return True

    def _leaf(self, node: fx.Node) -> _Layout:
        """A call the tracer keeps whole -- a function wrapped with ``torch.fx.wrap`` (a
        ``drop_path``), a leaf module without a kind -- or an operation the tables lack. Its
        channels pass through when it acts on each channel on its own, which is checked by
        running it (on a copy, random inputs, the same random seed each time): dropping and
        reordering channels of its input must drop and reorder them in its output, nothing
        else. Otherwise it is refused, naming the node and what the user can do."""
        followed = [a for a in node.all_input_nodes if self.layouts.get(a) is not None]
        why = _not_channelwise(node, followed, self.layouts, self.modules)
        if why is None:
            return self._input(node, followed[0])
        if node.op == "call_module":
            module = self.modules[node.target]
            name = type(module).__name__
            raise UnsupportedError(
                f"module {node.target!r} ({name}) is not understood by the channel analysis "
                f"({why}); structured pruning cannot follow it. If channels pass through it, "
                f"register_layer_spec(LayerSpec({name}, graph_kind='same')) (lighten.layers); "
                "else use prune.magnitude")
        fix = (f"; if channels pass through it, lighten.graph.FUNCTION_KINDS[{_op_name(node)}] "
               "= 'same'" if node.op == "call_function" else "")
        raise UnsupportedError(f"{_where(node)}: operation {_op_name(node)} is not understood "
                               f"({why}); structured pruning cannot follow it{fix} (or use "
                               "prune.magnitude instead)")


def _counts_channels(how, src: fx.Node, axis: int, rank: int) -> int | None:
    """``n`` when ``how`` is ``src``'s channel count divided by n (``x.size(1) // n``,
    ``x.shape[1] // n``), else None."""
    if not (isinstance(how, fx.Node) and how.target is operator.floordiv
            and type(how.args[1]) is int):
        return None
    size = how.args[0]
    if not isinstance(size, fx.Node):
        return None
    if size.target == "size" and len(size.args) == 2:  # x.size(1)
        owner, dim = size.args
    elif size.target is operator.getitem and isinstance(size.args[0], fx.Node):
        whole, dim = size.args  # x.shape[1], x.size()[1]
        if not ((whole.target == "size" and len(whole.args) == 1)
                or (whole.target is getattr and whole.args[1] == "shape")):
            return None
        owner = whole.args[0]
    else:
        return None
    if owner is not src or type(dim) is not int or dim % rank != axis:
        return None
    return how.args[1]


def _index_axes(index, rank: int) -> list[int | None] | None:
    """Per output axis of ``t[index]``, the axis of ``t`` it is (None: added by ``None``);
    None unless the index holds only ``None``, ``:``, ``...`` and integers."""
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1 or not all(
            i is None or i is Ellipsis or type(i) is int
            or (isinstance(i, slice) and i == slice(None)) for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - sum(i is not None for i in items) + 1)
    axes, dim = [], 0
    for item in items:
        if item is None:
            axes.append(None)
            continue
        if isinstance(item, slice):
            axes.append(dim)
        dim += 1
    return axes + list(range(dim, rank))


def _view_axes(src: tuple[int, ...], out: tuple[int, ...]) -> list[int | None] | None:
    """Per output axis of a view that only adds or drops size-1 axes, the source axis it is."""
    big_src = [i for i, n in enumerate(src) if n != 1]
    big_out = [i for i, n in enumerate(out) if n != 1]
    if [src[i] for i in big_src] != [out[i] for i in big_out]:
        return None
    axes: list[int | None] = [None] * len(out)
    for o, i in zip(big_out, big_src, strict=True):
        axes[o] = i
    return axes


def _source_axes(const: _Const, rank: int) -> tuple[int | None, ...]:
    """Per axis of a constant's value, the axis of its parameter (None: added)."""
    if const.axes is not None:
        return const.axes
    lead = len(const.literal) - rank
    return tuple(i - lead if i >= lead else None for i in range(len(const.literal)))


def _not_channelwise(node: fx.Node, followed: list[fx.Node], layouts: dict,
                     modules: dict[str, nn.Module]) -> str | None:
    """Why the call at ``node`` cannot be shown to act on each channel on its own (None: it
    can): it must take one tensor with channels and nothing else computed, keep its shape, and
    give ``f(x[:, idx])[:, j] == f(x)[:, idx[j]]`` for a random subset ``idx`` in random order."""
    if len(followed) != 1:
        return "it takes no tensor with channels" if not followed else \
            "it takes several tensors with channels"
    src = followed[0]
    layout = layouts[src]
    if not isinstance(layout, _Layout):
        return "its input is a channel axis split in two, or several outputs"
    if any(a is not src for a in node.all_input_nodes):
        return "it takes values computed at run time besides the channels"
    shape, out = _shape(src), _shape(node)
    dtype = getattr(src.meta.get("tensor_meta"), "dtype", None)
    if out != shape:
        return f"it changes the shape {shape} -> {out}"
    if dtype is None or not dtype.is_floating_point:
        return "its input is not a float tensor"
    axis, width = layout.axis, shape[layout.axis]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    idx = torch.randperm(width, generator=gen)[:max(1, width - 1 - width // 3)]

    def call(t: torch.Tensor):
        args = fx.node.map_arg(node.args, lambda _n: t)
        kwargs = fx.node.map_arg(node.kwargs, lambda _n: t)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)  # the same dropped samples (a drop path) in both calls
            if node.op == "call_module":
                return copy.deepcopy(modules[node.target])(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    try:
        full, part = call(x), call(x.index_select(axis, idx))
    except Exception as err:  # noqa: BLE001 -- any failure means "not per channel"
        return f"it fails on fewer channels ({type(err).__name__})"
    if not (isinstance(full, torch.Tensor) and isinstance(part, torch.Tensor)
            and part.shape == full.index_select(axis, idx).shape
            and torch.allclose(part, full.index_select(axis, idx), rtol=1e-4, atol=1e-5)):
        return "its output channels do not follow its input channels one to one"
    return None
