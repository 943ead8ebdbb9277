"""The analysis's output: :class:`Group` s of :class:`Member` s, all a pruning algorithm reads.

A plain data model kept apart from the tracing so that importance criteria, ``round_to`` and
surgery (lighten.prune) depend on these two small classes only, never on torch.fx.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
