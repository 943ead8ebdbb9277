"""What the analysis knows about one traced value: where its channels are and what they are made of.

A :class:`Layout` is a channel axis plus the channel *spaces* laid along it (a :class:`Seg` each:
a space, its size and how many consecutive features one of its channels spans); a
:class:`Split` is a channel axis viewed as two (a channel shuffle or attention heads, mid-way).
The node helpers read the facts every operator handler needs from an fx node (its propagated
shape, a name for error messages, a size hard-coded into the forward). Nothing here mutates the
analysis state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx


@dataclass(frozen=True)
class Seg:
    """``size`` channels of channel space ``space``, each ``block`` consecutive positions."""

    space: int
    size: int
    block: int = 1


@dataclass(frozen=True)
class Layout:
    """A value's channel axis and the segments that make it up, in order."""

    axis: int  # non-negative channel axis of the value
    segs: tuple[Seg, ...]

    @property
    def width(self) -> int:
        """Length of the channel axis."""
        return sum(s.size * s.block for s in self.segs)


@dataclass(frozen=True)
class Split:
    """The channel axis viewed as two axes ``(groups, width // groups)`` -- the first half of a
    channel shuffle; ``swapped`` once a transpose exchanged them. Only a merge may follow."""

    layout: Layout
    groups: int
    swapped: bool = False


class Untied(Exception):
    """Channels cannot be tied into equal groups (the caller pins or refuses)."""


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """``node``'s propagated tensor shape (None: not a single tensor)."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def where(node: fx.Node) -> str:
    """The module a node belongs to, for error messages."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()), None) if stack else None
    path = owner[0] if isinstance(owner, tuple) else None
    return f"node {node.name!r}" + (f" in module {path!r}" if path else "")


def op_name(node: fx.Node) -> str:
    """The operation ``node`` calls, as the user wrote it (``tensor.view()``, ``cat``)."""
    if node.op == "call_method":
        return f"tensor.{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def literal_size(node: fx.Node, axis: int) -> int | None:
    """The size a view/reshape hard-codes for output ``axis`` (None if computed or -1)."""
    if node.op == "call_module" or node.target in ("flatten", torch.flatten, "unsqueeze"):
        return None
    sizes = node.args[1:] or (node.kwargs.get("shape"),)
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    size = sizes[axis] if axis < len(sizes) else None
    return size if isinstance(size, int) and size != -1 else None
