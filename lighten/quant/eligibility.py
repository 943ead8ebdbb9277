"""Which layers a quantizer may swap for its own module.

Some PyTorch modules read their children's weights directly instead of calling them (the fused
fast paths of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention``). Every quantizer first
calls :func:`unfuse_stock_blocks`, which replaces PyTorch's own transformer blocks by equivalent
ones made of plain Linear layers (:mod:`lighten.unfused`), so those are quantized like any other.
What is left -- a subclass with its own forward, an option with no unfused form -- would crash
(no ``.weight``) or, worse, be silently bypassed if a child were replaced; those layers stay
float, with a note that says why and what to do.
"""

from __future__ import annotations

from torch import nn

WEIGHT_READING_PARENTS: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.MultiheadAttention,
)


def unfuse_stock_blocks(model: nn.Module, notes: list[str], ignore=()) -> list[str]:
    """Swap PyTorch's transformer blocks (encoder/decoder layers and stacks, MultiheadAttention,
    a PrunedMultiheadAttention) in ``model`` for their unfused forms, in place, before a
    quantizer collects its layers; modules in ``ignore`` (and below) stay. Returns the paths."""
    from lighten.unfused import unfuse_

    done = unfuse_(model, ignore=ignore, notes=notes)
    if done:
        notes.append(f"unfused {len(done)} PyTorch transformer block(s) into plain Linear layers "
                     f"to quantize them: {', '.join(done[:4])}{' ...' if len(done) > 4 else ''}")
    return done


def blocked_by_parent(model: nn.Module, name: str) -> str | None:
    """Why layer ``name`` must stay float because an enclosing module reads its weight, or None."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent_name = ".".join(parts[:depth])
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, WEIGHT_READING_PARENTS):
            where = parent_name or "the model"
            return (f"{name} left in float: {where} ({type(parent).__name__}) reads its weight "
                    "directly (PyTorch's fused path); build the block from plain modules to "
                    "quantize it")
    return None


def swappable(model: nn.Module, names: list[str], notes: list[str]) -> list[str]:
    """``names`` without the layers :func:`blocked_by_parent` rejects; reasons go to ``notes``."""
    kept = []
    for name in names:
        reason = blocked_by_parent(model, name)
        if reason is None:
            kept.append(name)
        else:
            notes.append(reason)
    return kept
