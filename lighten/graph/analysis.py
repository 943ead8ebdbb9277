"""The walk: trace the model, give every fx node a layout, hand each operator to its handler.

:func:`channel_groups` traces and propagates shapes; :class:`Analysis` holds the per-run state
(the spaces of :class:`~.spaces.Spaces`, each node's layout, the parameters and parameter-derived
values seen so far, token-mixing side spaces) and visits the nodes in order. Which function
handles an operator is the explicit :data:`HANDLERS` table, keyed by the kind :mod:`.facts` gives;
the handlers live in the ``ops_*`` modules, one per operator family. Nothing else traces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from lighten.errors import UnsupportedError
from lighten.graph import ops_attention, ops_join, ops_layers, ops_shape
from lighten.graph.facts import node_kind
from lighten.graph.groups import Group
from lighten.graph.layout import Layout, Seg, Split, op_name, shape_of, where
from lighten.graph.ops_attention import follow_side
from lighten.graph.ops_opaque import leaf
from lighten.graph.ops_params import Const, const_view, from_constants
from lighten.graph.spaces import Spaces
from lighten.layers import symbolic_trace

# kind (lighten.graph.facts) -> handler(analysis, node) -> the node's layout (None: no channels;
# a tuple for a call returning several values). Each ops module's table sits by its handlers.
HANDLERS: dict[str, Callable[[Analysis, fx.Node], object]] = {
    **ops_layers.HANDLERS, **ops_shape.HANDLERS, **ops_join.HANDLERS, **ops_attention.HANDLERS,
}


def _refuse_fixed_structure(model: nn.Module) -> None:
    """Modules whose class sets ``structure_fixed_by = "step"`` (product-quantized layers, early
    exit and gating wrappers) hold a structure that step built around today's widths: channels
    are removed or merged before it, never after. One line saying so, not a trace error."""
    for name, module in model.named_modules():
        step = getattr(type(module), "structure_fixed_by", None)
        if step:
            where = f"{name} ({type(module).__name__})" if name else type(module).__name__
            raise UnsupportedError(f"channels cannot be removed or merged in {where}: {step} "
                                   f"built it; run structural steps (prune.channels, "
                                   f"share.channels, ...) before {step}")


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[Group]:
    """Trace ``model`` and return its channel groups (pinned ones included, in graph order)."""
    from torch.fx.passes.shape_prop import ShapeProp

    _refuse_fixed_structure(model)
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
    return Analysis(gm, model).run()


class Analysis(Spaces):
    """One run of the analysis over a traced, shape-propagated module (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        super().__init__()
        self.gm = gm
        self.modules = dict(gm.named_modules())
        # the user's modules: tracing copies their buffers as persistent ones
        self.originals = dict(model.named_modules())
        self.layouts: dict[fx.Node, Layout | Split | None] = {}
        self.consts: dict[fx.Node, Const] = {}
        # values whose channels are not followed, with why: computed from parameters / buffers
        # alone (a relative position bias gathered from its table, an attention mask), or from
        # channels kept whole (split into attention heads); where they meet followed channels
        # those are pinned
        self.derived: dict[fx.Node, str] = {}
        # a second followed axis: the features a Linear writes along an axis that is not the
        # channel axis (MLP-Mixer's token mixing), with that Linear's name
        self.side: dict[fx.Node, tuple[Layout, str]] = {}
        self.side_read: set[tuple[fx.Node, fx.Node]] = set()  # (value, the Linear reading it)

    def run(self) -> list[Group]:
        """Visit every node in graph order; each space left standing is one group."""
        for node in self.gm.graph.nodes:
            self.layouts[node] = self.visit(node)
            follow_side(self, node)
        roots: dict[int, Group] = {}
        for s in range(len(self.parent)):
            r = self.find(s)
            if r not in roots and r not in self.split_into and r not in self.coarse:
                pins = list(dict.fromkeys(self.pins[r]))
                roots[r] = Group(self.size[r], list(dict.fromkeys(self.members[r])), pins)
        return list(roots.values())

    def visit(self, node: fx.Node) -> Layout | Split | None:
        """``node``'s layout: inputs, parameters and the output here, operators by kind."""
        if node.op == "placeholder":
            shape = shape_of(node)
            if shape is None or len(shape) < 2:
                return None
            return Layout(1, (Seg(self.new_space(shape[1], "model input"), shape[1]),))
        if node.op == "get_attr":
            self.consts[node] = Const(node, (None,) * len(shape_of(node) or ()))
            return None
        if node.op == "output":
            for arg in node.all_input_nodes:
                layout = self.layouts.get(arg)
                for one in layout if isinstance(layout, tuple) else (layout,):
                    if one is not None:
                        self.pin(one.layout if isinstance(one, Split) else one, "model output")
            return None
        if node.op in ("call_function", "call_method") and const_view(self, node):
            return None
        if node.op in ("call_function", "call_method") and from_constants(self, node):
            return None
        if node.op != "call_module" and shape_of(node) is None and not any(
                self.layouts.get(a) is not None or a in self.consts for a in node.all_input_nodes):
            return None  # Python arithmetic on sizes (c // 2): no tensor, no channels
        kind = node_kind(node, self.modules)
        if kind is None:  # a torch.fx.wrap'd function, a leaf module without a kind, an unknown
            return leaf(self, node)  # op: probed (channels pass through) or refused
        if kind == "refuse":
            raise UnsupportedError(f"{where(node)}: operation {op_name(node)} moves or selects "
                                   "channels; structured pruning cannot follow it (use "
                                   "prune.magnitude instead)")
        if kind not in ("reshape", "permute", "same", "meta") and any(
                isinstance(self.layouts.get(a), Split) for a in node.all_input_nodes):
            raise UnsupportedError(f"{where(node)}: {op_name(node)} works on a channel axis "
                                   "split in two; only a channel shuffle (view -> transpose -> "
                                   "view back) is understood there")
        return HANDLERS[kind](self, node)

    def input(self, node: fx.Node, arg=None) -> Layout:
        """The (resolved) layout of ``node``'s input ``arg`` (default its first argument);
        refuses values whose channels are not followed."""
        src = node.args[0] if arg is None else arg
        layout = self.layouts.get(src) if isinstance(src, fx.Node) else None
        if isinstance(layout, tuple):
            raise UnsupportedError(f"{where(node)}: {op_name(node)} takes the several outputs "
                                   "of one call at once; structured pruning follows them only "
                                   "when indexed (out[0])")
        if layout is None and src in self.derived:
            raise UnsupportedError(f"{where(node)}: {op_name(node)} gets values "
                                   f"{self.derived[src]}, whose channels are not followed; "
                                   "structured pruning cannot follow it")
        if layout is None:
            raise UnsupportedError(f"{where(node)}: {op_name(node)} gets an input whose "
                                   "channels cannot be followed (a constant or parameter)")
        return self.resolve(layout)

    def check_axis(self, node: fx.Node, layout: Layout, axis: int, what: str) -> None:
        """Refuse ``layout`` unless its channels are on ``axis`` (what ``what`` expects)."""
        if layout.axis != axis:
            raise UnsupportedError(f"{where(node)}: {what} expects channels on axis {axis} but "
                                   f"they are on axis {layout.axis}; structured pruning cannot "
                                   "follow this layout")
