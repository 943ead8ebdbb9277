"""One :class:`LayerSpec` per layer type: everything lighten knows about it, in one place.

Graph analysis (how channels flow), structured-pruning surgery (how to slice it), artifact replay
(which constructor arguments rebuild it), quantization (which int8 module replaces it) and
``lighten check`` (what each technique makes of it) all read these specs, so they cannot drift.
The old tables are views of :data:`LAYER_SPECS`: ``graph.MODULE_KINDS``, ``surgery.SURGERY``,
``quant.modules.QUANT_CLASSES``.

A spec names code in other lighten modules as ``"module:attribute"`` strings, resolved when first
used, so ``import lighten.layers`` stays light and free of import cycles; a user's spec may give
the callables / classes directly.

Registering a custom layer
--------------------------
A layer of your own that computes like a convolution or a Linear can be channel-pruned and
stored in artifacts like the built-in ones::

    from lighten.layers import LayerSpec, register_layer_spec
    from lighten.prune.surgery import conv_in, conv_out, slice_param

    class ScaledConv2d(nn.Module):         # weight (out, in, k, k), bias (out,), gain (out,)
        def __init__(self, in_channels, out_channels, kernel_size, *, padding=0, bias=True): ...

    def scaled_out(conv, keep):             # keep: the sorted output channels that stay
        conv_out(conv, keep)                # weight rows, bias, out_channels
        slice_param(conv, "gain", keep, 0)

    register_layer_spec(LayerSpec(
        ScaledConv2d,
        constructor_attrs=("in_channels", "out_channels", "kernel_size", "padding", "bias"),
        graph_kind="conv", surgery={"out": scaled_out, "in": conv_in}))

Contract per ``graph_kind`` (what the channel analysis and surgery read from the module):

* ``"conv"``: attributes ``in_channels``, ``out_channels``, ``groups``; ``weight`` of shape
  (out, in/groups, k...), channels on axis 1 of the input and output;
* ``"linear"``: ``in_features``, ``out_features``; ``weight`` (out, in); features on the last axis;
* ``"batchnorm"`` / ``"layernorm"``: per-channel parameters (axis 1 / the last axis);
* ``"same"``: output channels are the input channels (an activation, a pooling);
* ``"attention"``: ``nn.MultiheadAttention``'s call signature and tensors (``in_proj_weight``
  whose columns are the embedding channels of query/key/value, ``out_proj`` a Linear).

``surgery`` maps a member kind (``"out"``, ``"in"``, ``"depthwise"``, ``"norm"``) to
``fn(module, keep)`` that slices the module in place and updates its constructor attributes.
``constructor_attrs`` are read back from the module (``getattr``; ``"bias"`` is stored as
``bias is not None``) and passed as keyword arguments to rebuild it, so the class must accept
them. A registered class is a leaf for tracing: the channel analysis sees one call of it.
Register the spec where the class is defined (the models file a recipe names), so a saved
artifact finds it again when that file is imported to build the model.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

__all__ = ["GRAPH_KINDS", "LAYER_SPECS", "LayerSpec", "build_layer", "constructor_attrs",
           "layer_config", "layer_spec", "register_layer_spec", "spec_by_name",
           "symbolic_trace"]

Ref = Any  # a class / callable, or "module:attribute" resolved on first use

# How channels flow through a module, by kind (lighten.graph.analysis.HANDLERS maps each to
# its handler).
GRAPH_KINDS = ("conv", "convt", "linear", "batchnorm", "layernorm", "groupnorm", "same",
               "reshape", "shuffle", "attention")
SURGERY_KINDS = ("out", "in", "depthwise", "norm")
CONV_KINDS = ("conv", "convt")  # prune.channels' scope; "linear" producers are prune.neurons'


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """What lighten knows about one layer type (see the module docstring)."""

    cls: type[nn.Module]
    constructor_attrs: tuple[str, ...] | None = None  # None: artifacts cannot rebuild it
    graph_kind: str | None = None  # None: the channel analysis refuses it
    surgery: Mapping[str, Ref] = field(default_factory=dict)  # member kind -> fn(module, keep)
    static_quant: Ref | None = None  # Quant* twin (quant.ptq / qat / mixed); isinstance rule
    dynamic_quant: Ref | None = None  # quant.dynamic's replacement; exact type
    weight_only: Ref | None = None  # quant.weight_only's replacement; exact type
    why_not: Mapping[str, str] = field(default_factory=dict)  # technique -> reason, for check
    name: str = ""  # recorded in artifacts; defaults to the class name

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.cls.__name__)

    def surgery_fn(self, kind: str) -> Callable | None:
        ref = self.surgery.get(kind)
        return None if ref is None else _resolve(ref)

    @property
    def static_quant_class(self) -> type[nn.Module] | None:
        return _resolve(self.static_quant)

    @property
    def dynamic_quant_class(self) -> type[nn.Module] | None:
        return _resolve(self.dynamic_quant)

    @property
    def weight_only_class(self) -> type[nn.Module] | None:
        return _resolve(self.weight_only)

    @property
    def replayable(self) -> bool:
        """Whether artifacts may rebuild this layer from its constructor attributes."""
        return self.constructor_attrs is not None


_resolved: dict[str, Any] = {}


def _resolve(ref: Ref) -> Any:
    if not isinstance(ref, str):
        return ref
    if ref not in _resolved:
        module, attr = ref.split(":")
        _resolved[ref] = getattr(importlib.import_module(module), attr)
    return _resolved[ref]


# ----------------------------------------------------------------------------- built-in specs

_S = "lighten.prune.surgery:"
_Q = "lighten.quant.modules:"
_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
         "bias", "padding_mode")
_CONV_T = (*_CONV, "output_padding")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_CONV_SURGERY = {"out": _S + "conv_out", "in": _S + "conv_in", "depthwise": _S + "conv_depthwise"}
_CONV_T_SURGERY = {"out": _S + "conv_transpose_out", "in": _S + "conv_transpose_in",
                   "depthwise": _S + "conv_depthwise"}  # weight (C, 1, k...): rows, as a conv
_NO_STATIC_T = {"quantizable": "transposed convs have no static int8 form here (quantized: "
                               "Conv1d/2d/3d, Linear)"}


def _builtin_specs() -> list[LayerSpec]:
    specs = [
        LayerSpec(nn.Conv1d, _CONV, "conv", _CONV_SURGERY, _Q + "QuantConv1d"),
        LayerSpec(nn.Conv2d, _CONV, "conv", _CONV_SURGERY, _Q + "QuantConv2d",
                  weight_only="lighten.quant.weight_only:WeightOnlyConv2d"),
        LayerSpec(nn.Conv3d, _CONV, "conv", _CONV_SURGERY, _Q + "QuantConv3d"),
        *(LayerSpec(cls, _CONV_T, "convt", _CONV_T_SURGERY, why_not=_NO_STATIC_T)
          for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)),
        LayerSpec(nn.Linear, ("in_features", "out_features", "bias"), "linear",
                  {"out": _S + "linear_out", "in": _S + "linear_in"}, _Q + "QuantLinear",
                  dynamic_quant="lighten.quant.dynamic:DynamicQuantLinear",
                  weight_only="lighten.quant.weight_only:WeightOnlyLinear"),
        *(LayerSpec(cls, _BN, "batchnorm", {"norm": _S + "batchnorm"})
          for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
        LayerSpec(nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias"),
                  "layernorm", {"norm": _S + "layernorm"}),
        LayerSpec(nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine"), "groupnorm"),
        LayerSpec(nn.Embedding, ("num_embeddings", "embedding_dim", "padding_idx", "max_norm",
                                 "norm_type", "scale_grad_by_freq", "sparse"),
                  dynamic_quant="lighten.quant.embedding:Int8Embedding"),
        LayerSpec(nn.Identity, (), "same"),  # e.g. a BatchNorm folded away
        LayerSpec(nn.LSTM, dynamic_quant="lighten.quant.dynamic_rnn:DynamicQuantLSTM"),
        # embedding width pruned by prune.channels (it becomes a PrunedMultiheadAttention)
        LayerSpec(nn.MultiheadAttention, graph_kind="attention"),
        LayerSpec(nn.Flatten, graph_kind="reshape"),
        LayerSpec(nn.ChannelShuffle, graph_kind="shuffle"),
    ]
    specs += [LayerSpec(cls, graph_kind="same") for cls in (
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
        nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
        nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d)]
    return specs


LAYER_SPECS: dict[type[nn.Module], LayerSpec] = {s.cls: s for s in _builtin_specs()}
_BY_NAME: dict[str, LayerSpec] = {s.name: s for s in LAYER_SPECS.values()}
_version = 0  # bumped by register_layer_spec: the table views rebuild


# ----------------------------------------------------------------------------- lookups


def layer_spec(module_or_cls: nn.Module | type, *, exact: bool = False) -> LayerSpec | None:
    """The spec of a module or class: its own, else (unless ``exact``) the nearest base class's
    along the MRO (a user subclass of ``nn.Conv2d`` slices like ``nn.Conv2d``)."""
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    if exact:
        return LAYER_SPECS.get(cls)
    for base in cls.__mro__:
        spec = LAYER_SPECS.get(base)
        if spec is not None:
            return spec
    return None


def spec_by_name(name: str) -> LayerSpec | None:
    """The replayable spec an artifact names (``LayerSpec.name``), or None."""
    spec = _BY_NAME.get(name)
    return spec if spec is not None and spec.replayable else None


def register_layer_spec(spec: LayerSpec) -> LayerSpec:
    """Add (or replace) the spec of ``spec.cls``; returns it. See the module docstring."""
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_layer_spec needs a LayerSpec, got {type(spec).__name__}")
    if not (isinstance(spec.cls, type) and issubclass(spec.cls, nn.Module)):
        raise TypeError(f"LayerSpec.cls must be an nn.Module class, got {spec.cls!r}")
    if spec.graph_kind is not None and spec.graph_kind not in GRAPH_KINDS:
        raise ValueError(f"graph_kind {spec.graph_kind!r} is not one of {GRAPH_KINDS}")
    unknown = [k for k in spec.surgery if k not in SURGERY_KINDS]
    if unknown:
        raise ValueError(f"surgery kinds {unknown} are not among {SURGERY_KINDS}")
    if spec.constructor_attrs is not None and not all(
            isinstance(a, str) for a in spec.constructor_attrs):
        raise TypeError("constructor_attrs must be a tuple of attribute names")
    taken = _BY_NAME.get(spec.name)
    if taken is not None and taken.cls.__qualname__ != spec.cls.__qualname__:
        raise ValueError(f"layer name {spec.name!r} is taken by {taken.cls.__module__}."
                         f"{taken.cls.__qualname__}; give the spec another name=")
    global _version
    LAYER_SPECS[spec.cls] = spec  # the same class imported again (by path) replaces the old
    _BY_NAME[spec.name] = spec
    _version += 1
    return spec


def constructor_attrs(module_or_cls: nn.Module | type) -> tuple[str, ...] | None:
    """Constructor arguments that rebuild this exact type, or None if it is not replayable."""
    spec = layer_spec(module_or_cls, exact=True)
    return None if spec is None else spec.constructor_attrs


def layer_config(module: nn.Module) -> dict[str, Any]:
    """JSON-normalised constructor arguments of a replayable layer (tuples become lists, ``bias``
    a bool). Raises KeyError for a type without constructor attributes."""
    attrs = constructor_attrs(module)
    if attrs is None:
        raise KeyError(f"{type(module).__name__} has no LayerSpec with constructor_attrs")
    values = {}
    for name in attrs:
        value = getattr(module, name)
        values[name] = (value is not None) if name == "bias" else value
    return json.loads(json.dumps(values))


def build_layer(name: str, config: Mapping[str, Any]) -> nn.Module:
    """A fresh layer from :func:`layer_config`'s output and its spec name (lists become tuples).
    Raises KeyError for an unknown name, TypeError / ValueError when the class refuses the
    arguments."""
    spec = spec_by_name(name)
    if spec is None:
        raise KeyError(name)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return spec.cls(**kwargs)


# ----------------------------------------------------------------------------- tracing


class SpecTracer(fx.Tracer):
    """fx's tracer, with every class that has its own registered spec kept as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in LAYER_SPECS or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with :class:`SpecTracer`."""
    tracer = SpecTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# ----------------------------------------------------------------------------- table views


class SpecView(Mapping):
    """A read-only, live table derived from :data:`LAYER_SPECS` (the old tables' names)."""

    def __init__(self, items: Callable[[], Iterator[tuple[Any, Any]]], what: str):
        self._items, self._what = items, what
        self._cache: tuple[tuple[int, int], dict] | None = None

    def _table(self) -> dict:
        key = (_version, len(LAYER_SPECS))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, dict(self._items()))
        return self._cache[1]

    def __getitem__(self, key):
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __contains__(self, key) -> bool:
        return key in self._table()

    def __repr__(self) -> str:
        return f"<{self._what}: a view of lighten.layers.LAYER_SPECS, {len(self)} entries>"


def _kinds():
    return ((c, s.graph_kind) for c, s in LAYER_SPECS.items() if s.graph_kind is not None)


def _surgery():
    return (((c, k), s.surgery_fn(k)) for c, s in LAYER_SPECS.items() for k in s.surgery)


def _static():
    return ((c, s.static_quant_class) for c, s in LAYER_SPECS.items() if s.static_quant)


def module_kinds_view() -> SpecView:
    """layer type -> graph kind (``graph.MODULE_KINDS``)."""
    return SpecView(_kinds, "MODULE_KINDS")


def surgery_view() -> SpecView:
    """(layer type, member kind) -> slicing function (``surgery.SURGERY``)."""
    return SpecView(_surgery, "SURGERY")


def quant_classes_view() -> SpecView:
    """float layer type -> static int8 class (``quant.modules.QUANT_CLASSES``)."""
    return SpecView(_static, "QUANT_CLASSES")


def static_quant_types() -> tuple[type[nn.Module], ...]:
    """Float layer types quant.ptq / qat / mixed turn into int8 layers (isinstance rule)."""
    return tuple(c for c, s in LAYER_SPECS.items() if s.static_quant)


# ----------------------------------------------------------------------------- what quantizers swap


def static_quant_class(module: nn.Module) -> type[nn.Module] | None:
    """The int8 class quant.ptq / qat / mixed give ``module`` (its nearest spec's), or None."""
    for base in type(module).__mro__:
        spec = LAYER_SPECS.get(base)
        if spec is not None and spec.static_quant is not None:
            return spec.static_quant_class
    return None


def dynamic_quant_class(module: nn.Module) -> type[nn.Module] | None:
    """quant.dynamic's replacement for exactly this type, or None."""
    spec = LAYER_SPECS.get(type(module))
    return None if spec is None else spec.dynamic_quant_class


def weight_only_class(module: nn.Module) -> type[nn.Module] | None:
    """quant.weight_only's replacement for exactly this type, or None."""
    spec = LAYER_SPECS.get(type(module))
    return None if spec is None else spec.weight_only_class
