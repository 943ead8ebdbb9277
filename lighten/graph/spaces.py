"""Channel spaces and their union-find: the bookkeeping every operator handler writes to.

A *space* is a run of channels that are pruned as one index set; the members (weight axes) and
pin reasons attached to it become a :class:`~.groups.Group`. Spaces are merged where operators
couple them (:meth:`Spaces.unify`), cut into independent pieces where a concatenation meets one
tensor (:meth:`~Spaces.partition`), split into tied copies where a grouped conv or a chunk needs
the same channels in every group (:meth:`~Spaces.tie`), and coarsened where a join holds runs of
channels as one (after a shuffle). Layouts recorded earlier are brought up to date with
:meth:`~Spaces.resolve`. Knows nothing of fx beyond a node to name in errors.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from lighten.errors import UnsupportedError
from lighten.graph.groups import Member
from lighten.graph.layout import Layout, Seg, Untied, op_name, where


def _cut(a: Layout, b: Layout) -> tuple[int, list[int]] | None:
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


class Spaces:
    """Channel spaces under union-find, with the members and pin reasons attached to each."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: list[list[Member]] = []
        self.pins: list[list[str]] = []
        self.bound: dict[tuple[str, str], Layout] = {}  # (module, role) -> layout (reuse)
        self.split_into: dict[int, list[int]] = {}  # root -> its pieces (or copies)
        self.coarse: dict[int, tuple[int, int]] = {}  # root -> (space, k): k channels as one

    def new_space(self, size: int, pin: str | None = None) -> int:
        """A fresh space of ``size`` channels (pinned when ``pin`` says why)."""
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.members.append([])
        self.pins.append([pin] if pin else [])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        """The root of space ``s`` (path halving)."""
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

    def resolve(self, layout: Layout) -> Layout:
        """``layout`` with every split space replaced by its copies (layouts are stored early)."""
        segs = tuple(seg for s in layout.segs for seg in self._expand(s))
        return layout if segs == layout.segs else Layout(layout.axis, segs)

    def _expand(self, seg: Seg) -> tuple[Seg, ...]:
        root = self.find(seg.space)
        if root in self.coarse:
            new, k = self.coarse[root]
            return self._expand(Seg(new, self.size[new], seg.block * k))
        if root not in self.split_into:
            return (seg,)
        return tuple(part for piece in self.split_into[root]
                     for part in self._expand(Seg(piece, self.size[piece], seg.block)))

    def unify(self, a: Layout, b: Layout, node: fx.Node) -> None:
        """Make ``a`` and ``b`` the same channels (after :meth:`align`); refuse if they differ."""
        a, b = self.align(a, b)
        shape_a = [(s.size, s.block) for s in a.segs]
        shape_b = [(s.size, s.block) for s in b.segs]
        if shape_a != shape_b:
            raise UnsupportedError(f"{where(node)}: {op_name(node)} joins channel layouts "
                                   f"{shape_a} and {shape_b} that do not line up (e.g. a concat "
                                   "added to one tensor); exclude this part or restructure it")
        for sa, sb in zip(a.segs, b.segs, strict=True):
            ra, rb = self.find(sa.space), self.find(sb.space)
            if ra != rb:
                self.parent[rb] = ra
                self.members[ra] += self.members[rb]
                self.pins[ra] += self.pins[rb]

    def align(self, a: Layout, b: Layout) -> tuple[Layout, Layout]:
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

    def _coarser(self, a: Layout, b: Layout) -> tuple[int, int] | None:
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

    def tie(self, layout: Layout, groups: int, node: fx.Node) -> Layout:
        """Cut ``layout`` into ``groups`` equal parts whose channels are tied position by position
        (a grouped conv keeps the same channels in every group); return one part."""
        layout = self.resolve(layout)
        if groups < 1 or layout.width % groups:
            raise Untied(f"{layout.width} channels do not split into {groups} groups")
        unit = layout.width // groups
        while big := next((s for s in layout.segs if s.size * s.block > unit), None):
            copies = big.size * big.block // unit
            if big.size * big.block % unit or big.size % copies:
                raise Untied(f"{big.size} channels (x{big.block}) do not split into "
                             f"{unit}-wide groups")
            self.split(big.space, copies)
            layout = self.resolve(layout)
        chunks, part, width = [], [], 0
        for seg in layout.segs:
            part.append(seg)
            width += seg.size * seg.block
            if width > unit:
                raise Untied("concatenated tensors straddle the group boundaries")
            if width == unit:
                chunks.append(Layout(layout.axis, tuple(part)))
                part, width = [], 0
        for chunk in chunks[1:]:
            try:  # aligning cuts or coarsens spaces where the groups' tensors differ in size
                self.unify(chunks[0], chunk, node)
            except UnsupportedError:
                raise Untied("the groups are made of differently sized concatenated "
                             "tensors") from None
        return self.resolve(chunks[0])

    def pin(self, layout: Layout, reason: str) -> None:
        """Keep every space of ``layout`` whole, saying why."""
        for seg in self.resolve(layout).segs:
            self.pins[self.find(seg.space)].append(reason)

    def attach(self, layout: Layout, module: str, kind: str, transposed: bool = False) -> None:
        """Add ``module``'s axis as a member of every space in ``layout``, at its offset."""
        offset = 0
        for seg in self.resolve(layout).segs:
            self.members[self.find(seg.space)].append(
                Member(module, kind, offset, seg.block, transposed))
            offset += seg.size * seg.block

    def bind(self, module: str, role: str, layout: Layout, node: fx.Node) -> Layout:
        """A module called twice shares weights: its layouts must be the same spaces."""
        key = (module, role)
        if key in self.bound:
            self.unify(self.bound[key], layout, node)
            return self.resolve(self.bound[key])
        self.bound[key] = layout
        return layout
