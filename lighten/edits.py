"""The structure of a saved model: an ordered log of JSON edits that turns the source model into it.

An artifact does not store code. It names how to build the *source* model (a zoo name, a
``python:`` factory, or nothing) and then lists the structural edits that turn that source into
the saved model; loading builds the source, replays the edits and loads the tensors.

The log is *derived*, not kept by the steps: :func:`derive_edits` walks the saved model and a
fresh source side by side (pre-order, child by child) and records the first difference on every
path. Each recorded edit is applied to the fresh copy at once, with the same function replay
uses, so what is saved is exactly what a load rebuilds. A step therefore never has to remember
to log what it did: prune, quantize, factorize, swap a student in, add an exit head -- any
change made of describable modules is captured, in any order of steps.

Edit operations (``op``), each a small registered function in :data:`EDIT_OPS`:

* ``module``: put a module at ``path`` (replacing, adding, or the root ``""``), built either as
  a standard torch layer from its constructor arguments (``layer`` + ``attrs``; the attributes
  come from :mod:`lighten.layers` where a spec exists, else from the constructor's signature,
  and are checked by rebuilding at save time) or as a registered custom type (``type`` +
  ``config``, :mod:`lighten.modules`). Its children are then diffed in turn, so a registered
  module's own children may be replaced again (a pruned attention whose projections were
  quantized afterwards).
* ``remove``: delete the child at ``path``; ``none``: set that child slot to None.
* ``share``: make ``path`` the same module object as ``of`` (tied modules stay tied).
* ``order``: the order of a module's children (a ``Sequential`` runs them in that order).
* ``value``: a plain bool/int/float attribute of a module, or a tuple/list of them (a head
  count, a flag, a norm's ``normalized_shape``).
* ``tensor``: an own parameter/buffer that was resized, added or dropped (shape, dtype, kind);
  its values come from the stored tensors.

A module the log cannot describe -- an instance of a user class at a path where the source has
none, or a layer whose constructor arguments cannot be read back -- is refused at save time with
the module's path, its type and the fix, never saved into a file that will not load.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lighten.errors import CheckpointError
from lighten.modules import get_module_type, registered_key

# Containers that take no constructor facts: their children are recorded as edits of their own.
_CONTAINERS: dict[str, type[nn.Module]] = {
    "Sequential": nn.Sequential, "ModuleList": nn.ModuleList, "ModuleDict": nn.ModuleDict,
}
_VALUE_TYPES = (bool, int, float)
_SKIP_ARGS = {"self", "device", "dtype"}


# ----------------------------------------------------------------------------- describing layers


def layer_class(name: str) -> type[nn.Module] | None:
    """A rebuildable layer class by its recorded name: a container, a class with a layer spec
    (:mod:`lighten.layers`, users' registered layers included) or one ``torch.nn`` exports."""
    if name in _CONTAINERS:
        return _CONTAINERS[name]
    from lighten.layers import spec_by_name

    spec = spec_by_name(name)
    if spec is not None:
        return spec.cls
    cls = getattr(nn, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module) and _is_torch_layer(cls):
        return cls
    return None


def _is_torch_layer(cls: type) -> bool:
    return cls.__module__.startswith("torch.nn.modules") and getattr(nn, cls.__name__, None) is cls


def layer_name(module: nn.Module) -> str:
    """The name an edit records for ``module``'s class (its spec's name where it has one)."""
    from lighten.layers import layer_spec

    spec = layer_spec(module, exact=True)
    return spec.name if spec is not None and spec.replayable else type(module).__name__


def constructor_attrs(module: nn.Module) -> dict[str, Any] | None:
    """JSON constructor arguments that rebuild ``module``, or None if it cannot be rebuilt.

    A layer spec (:mod:`lighten.layers`) names them where one exists, for torch's layers and a
    user's registered ones; other ``torch.nn`` layers fall back to their constructor's
    parameters read back as attributes of the same name (a boolean ``bias`` becomes "has a
    bias"). Callers verify the result by rebuilding (:func:`_rebuilt_matches`).
    """
    from lighten.layers import constructor_attrs as spec_attrs

    cls = type(module)
    if cls.__name__ in _CONTAINERS and cls is _CONTAINERS[cls.__name__]:
        return {}
    names = spec_attrs(module)
    if names is None:
        if not _is_torch_layer(cls):
            return None
        try:
            params = inspect.signature(cls.__init__).parameters.values()
        except (TypeError, ValueError):
            return None
        names = [p.name for p in params if p.name not in _SKIP_ARGS
                 and not p.name.startswith("_")
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # Identity(*args)
    attrs = {}
    for name in names:
        if not hasattr(module, name):
            return None
        value = getattr(module, name)
        if name == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        attrs[name] = value
    try:
        return json.loads(json.dumps(attrs))
    except (TypeError, ValueError):
        return None


def build_layer(name: str, attrs: dict) -> nn.Module:
    """A layer from its recorded name and constructor arguments."""
    cls = layer_class(name)
    if cls is None:
        raise CheckpointError(f"unknown layer type {name!r} in the artifact's edits; it needs a "
                              "newer lighten, or register its layer spec before loading")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot rebuild {name} from {attrs} ({err}); re-save it") from None


def own_tensors(module: nn.Module) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Own parameters and buffers as name -> (kind, tensor); kind 'parameter'/'buffer'/'none'."""
    found: dict[str, tuple[str, torch.Tensor | None]] = {}
    for name, t in module._parameters.items():
        found[name] = ("parameter", t) if t is not None else ("none", None)
    for name, t in module._buffers.items():
        found[name] = ("buffer", t) if t is not None else ("none", None)
    return found


def _same_class(a: nn.Module, b: nn.Module) -> bool:
    # a user's model file may be imported twice, by path and by module name: compare names
    return type(a) is type(b) or type(a).__qualname__ == type(b).__qualname__


def _same_construction(module: nn.Module, ref: nn.Module | None) -> bool:
    """Would ``ref`` (the source, edits so far applied) serve as ``module``'s skeleton as is?"""
    if ref is None or not _same_class(module, ref):
        return False
    key = registered_key(module)
    if key is not None:
        return module.artifact_config() == ref.artifact_config()
    attrs = constructor_attrs(module)
    return attrs is None or attrs == constructor_attrs(ref)  # shapes: tensor edits follow


def _describable(module: nn.Module) -> bool:
    """A registered module, or a torch layer (not a container) whose arguments read back."""
    if registered_key(module) is not None:
        return True
    return type(module).__name__ not in _CONTAINERS and bool(constructor_attrs(module))


def describe_module(module: nn.Module, path: str) -> dict:
    """The ``module`` edit that rebuilds an empty ``module`` at ``path``; refuses what it cannot."""
    key = registered_key(module)
    if key is not None:
        config = module.artifact_config()
        try:
            config = json.loads(json.dumps(config))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"cannot save {_where(path)}: {type(module).__name__}."
                                  f"artifact_config() is not JSON ({err})") from None
        return {"op": "module", "path": path, "type": key, "config": config}
    attrs = constructor_attrs(module)
    if attrs is not None:
        edit = {"op": "module", "path": path, "layer": layer_name(module), "attrs": attrs}
        if _rebuilt_matches(module, edit):
            return edit
    raise CheckpointError(
        f"cannot save {_where(path)}: its type {type(module).__qualname__} is not what the "
        "source model has there and lighten cannot rebuild it from a description; register it "
        "(lighten.modules.register_module_type with artifact_config/from_artifact, or a layer "
        "spec in lighten.layers), or name a function that builds it: a recipe's model: "
        "{python: FILE.py:FUNCTION}, save_artifact(..., model_spec={'python': "
        "'FILE.py:FUNCTION', 'input_shape': [...]})")


def _rebuilt_matches(module: nn.Module, edit: dict) -> bool:
    """Rebuilding from the recorded attributes reads back the same attributes (tensor shapes
    that still differ are recorded as tensor edits after it)."""
    try:
        with torch.random.fork_rng(devices=[]):
            rebuilt = build_layer(edit["layer"], edit["attrs"])
    except CheckpointError:
        return False
    return constructor_attrs(rebuilt) == edit["attrs"]


def _where(path: str) -> str:
    return f"module {path!r}" if path else "the root module"


# ----------------------------------------------------------------------------- replay


def _child(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, child name) of dotted ``path``; CheckpointError when the parent is gone."""
    parent_path, _, name = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else ():
        nxt = parent._modules.get(part)
        if nxt is None:
            raise CheckpointError(f"edit at {path!r}: the model has no module {parent_path!r}; "
                                  "pass the model it was saved from")
        parent = nxt
    return parent, name


def _module_at(model: nn.Module, path: str) -> nn.Module:
    if not path:
        return model
    parent, name = _child(model, path)
    module = parent._modules.get(name)
    if module is None:
        raise CheckpointError(f"edit at {path!r}: the model has no module there; pass the model "
                              "it was saved from")
    return module


def _apply_module(model: nn.Module, edit: dict) -> nn.Module:
    current = _existing(model, edit["path"])
    if current is not None and _already(current, edit):
        return model  # the skeleton has it already (keeps modules the caller tied)
    if "type" in edit:
        cls = get_module_type(edit["type"])
        try:
            new = cls.from_artifact(edit["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{edit['type']} at {edit['path']!r} rejects its config "
                                  f"({type(err).__name__}: {err}); re-save it") from None
    else:
        new = build_layer(edit["layer"], edit["attrs"])
    if edit["path"] == "":
        return new
    parent, name = _child(model, edit["path"])
    parent._modules[name] = new
    return model


def _existing(model: nn.Module | None, path: str) -> nn.Module | None:
    if model is None:
        return None
    if not path:
        return model
    try:
        parent, name = _child(model, path)
    except CheckpointError:
        return None
    return parent._modules.get(name)


def _already(module: nn.Module, edit: dict) -> bool:
    """Is ``module`` already what the ``module`` edit would build?"""
    if "type" in edit:
        return registered_key(module) == edit["type"] and module.artifact_config() == edit[
            "config"]
    return type(module) is layer_class(edit["layer"]) and constructor_attrs(module) == edit[
        "attrs"]


def _apply_remove(model: nn.Module, edit: dict) -> nn.Module:
    parent, name = _child(model, edit["path"])
    if name not in parent._modules:
        raise CheckpointError(f"edit removes {edit['path']!r}, which the model lacks; pass the "
                              "model it was saved from")
    del parent._modules[name]
    return model


def _apply_none(model: nn.Module, edit: dict) -> nn.Module:
    parent, name = _child(model, edit["path"])
    parent._modules[name] = None
    return model


def _apply_share(model: nn.Module, edit: dict) -> nn.Module:
    parent, name = _child(model, edit["path"])
    parent._modules[name] = _module_at(model, edit["of"])
    return model


def _apply_order(model: nn.Module, edit: dict) -> nn.Module:
    module = _module_at(model, edit["path"])
    names = edit["names"]
    if sorted(names) != sorted(module._modules):
        raise CheckpointError(f"edit reorders {edit['path']!r} as {names}, but its children are "
                              f"{list(module._modules)}; the file is corrupt, re-save it")
    reordered = {n: module._modules[n] for n in names}
    module._modules.clear()
    module._modules.update(reordered)
    return model


def _plain_value(value: Any) -> bool:
    """A scalar, or a tuple/list of scalars (a LayerNorm's ``normalized_shape``)."""
    if type(value) in _VALUE_TYPES:
        return True
    return type(value) in (tuple, list) and all(type(v) in _VALUE_TYPES for v in value)


def _apply_value(model: nn.Module, edit: dict) -> nn.Module:
    module = _module_at(model, edit["path"])
    name, value = edit.get("name"), edit.get("value")
    current = vars(module).get(name) if isinstance(name, str) else None
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)  # JSON has no tuples
    if (not isinstance(name, str) or name.startswith("_") or not _plain_value(value)
            or type(current) is not type(value)):
        raise CheckpointError(f"recorded value {name!r}={value!r} at {edit.get('path')!r} does "
                              f"not fit the model's attribute ({current!r}); pass the model it "
                              "was saved from")
    setattr(module, name, value)
    return model


def _apply_tensor(model: nn.Module, edit: dict) -> nn.Module:
    module = _module_at(model, edit["path"])
    name, kind = edit.get("name"), edit.get("kind")
    if not isinstance(name, str) or not name or "." in name:
        raise CheckpointError(f"tensor edit at {edit.get('path')!r} names {name!r}; the file is "
                              "corrupt, re-save it")
    if kind == "legacy_resize":  # version 2 'resized': same kind and dtype, new shape
        current = own_tensors(module).get(name, ("absent", None))
        if current[1] is None:
            raise CheckpointError(f"recorded shape of {name!r} at {edit.get('path')!r} does not "
                                  "fit the model; pass the model it was saved from")
        kind, edit = current[0], {**edit, "dtype": str(current[1].dtype).removeprefix("torch.")}
        if name in module._non_persistent_buffers_set:
            edit["persistent"] = False
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    module._non_persistent_buffers_set.discard(name)
    if kind == "absent":
        return model
    if kind == "none":
        module._buffers[name] = None
        return model
    shape, dtype = edit.get("shape"), getattr(torch, str(edit.get("dtype")), None)
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(dtype, torch.dtype) or kind not in ("parameter", "buffer")):
        raise CheckpointError(f"tensor edit {name!r} at {edit.get('path')!r} has shape {shape!r}, "
                              f"dtype {edit.get('dtype')!r}, kind {kind!r}; the file is corrupt, "
                              "re-save it")
    empty = torch.zeros(shape, dtype=dtype)
    if kind == "parameter":
        module._parameters[name] = nn.Parameter(empty, requires_grad=dtype.is_floating_point)
    else:
        module._buffers[name] = empty
        if edit.get("persistent") is False:
            module._non_persistent_buffers_set.add(name)
    return model


EDIT_OPS: dict[str, Callable[[nn.Module, dict], nn.Module]] = {
    "module": _apply_module, "remove": _apply_remove, "none": _apply_none, "share": _apply_share,
    "order": _apply_order, "value": _apply_value, "tensor": _apply_tensor,
}


def replay_edits(model: nn.Module | None, edits: list) -> nn.Module:
    """Apply ``edits`` in order to ``model`` (the source; None when the log builds the root)."""
    if not isinstance(edits, list):
        raise CheckpointError("the artifact's edits are not a list; the file is corrupt")
    for i, edit in enumerate(edits):
        op = edit.get("op") if isinstance(edit, dict) else None
        if op not in EDIT_OPS or not isinstance(edit.get("path"), str):
            raise CheckpointError(f"edit {i} ({str(edit)[:80]}) is not a known edit; it needs a "
                                  "newer lighten or the file is corrupt")
        if model is None and not (op == "module" and edit["path"] == ""):
            raise CheckpointError("the artifact has no source model and its first edit does not "
                                  "build the root; pass load_artifact(..., model=...)")
        model = EDIT_OPS[op](model, edit)
    if model is None:
        raise CheckpointError("the artifact has no source model and no edits that build one; "
                              "pass load_artifact(..., model=...)")
    return model


# ----------------------------------------------------------------------------- derive


def derive_edits(model: nn.Module, source: nn.Module | None, *,
                 source_unknown: bool = False) -> list[dict]:
    """The edits that turn ``source`` (modified in place) into ``model``'s structure.

    ``source_unknown``: the source could not be built here (``source`` is then a copy of
    ``model``); every describable module is recorded, so a load into the user's own fresh
    model (``load_artifact(..., model=...)``) still rebuilds pruned and replaced layers.
    """
    edits: list[dict] = []
    seen: dict[int, str] = {}
    root = [source]

    def record(edit: dict) -> None:
        edits.append(edit)
        root[0] = EDIT_OPS[edit["op"]](root[0], edit)

    def visit(path: str, module: nn.Module, ref: nn.Module | None) -> None:
        seen[id(module)] = path
        if not _same_construction(module, ref) or (source_unknown and _describable(module)):
            record(describe_module(module, path))
            ref = _module_at(root[0], path)
        _diff_values(path, module, ref, record)
        _diff_tensors(path, module, ref, record)
        for name, child in module._modules.items():
            child_path = f"{path}.{name}" if path else name
            ref_child = ref._modules.get(name)
            if child is None:
                _none_child(child_path, ref, name, record)
                continue
            if id(child) in seen:
                if ref_child is None or ref_child is not _module_at(root[0], seen[id(child)]):
                    record({"op": "share", "path": child_path, "of": seen[id(child)]})
                continue
            visit(child_path, child, ref_child)
        for name in [n for n in ref._modules if n not in module._modules]:
            record({"op": "remove", "path": f"{path}.{name}" if path else name})
        if list(module._modules) != list(ref._modules):
            record({"op": "order", "path": path, "names": list(module._modules)})

    visit("", model, source)
    return edits


def _none_child(path: str, ref: nn.Module, name: str, record) -> None:
    """A child slot set to None (``self.downsample = None``): the skeleton's slot too."""
    if ref._modules.get(name) is not None or name not in ref._modules:
        record({"op": "none", "path": path})


def _diff_values(path: str, module: nn.Module, ref: nn.Module, record) -> None:
    for name, value in vars(module).items():
        old = vars(ref).get(name)
        if (name.startswith("_") or name == "training" or not _plain_value(value)
                or type(old) is not type(value) or old == value):
            continue
        record({"op": "value", "path": path, "name": name, "value": value})


def _diff_tensors(path: str, module: nn.Module, ref: nn.Module, record) -> None:
    mine, theirs = own_tensors(module), own_tensors(ref)
    for name, (kind, t) in mine.items():
        old_kind, old = theirs.get(name, ("absent", None))
        persistent = name not in module._non_persistent_buffers_set
        same = (kind == old_kind and (t is None or (
            list(t.shape) == list(old.shape) and t.dtype == old.dtype))
            and persistent == (name not in ref._non_persistent_buffers_set))
        if same:
            continue
        edit = {"op": "tensor", "path": path, "name": name, "kind": kind}
        if t is not None:
            edit.update(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
            if kind == "buffer" and not persistent:
                edit["persistent"] = False
        record(edit)
    for name in theirs:
        if name not in mine:
            record({"op": "tensor", "path": path, "name": name, "kind": "absent"})


# ----------------------------------------------------------------------------- older manifests


def legacy_edits(manifest: dict) -> list[dict]:
    """The edit log equivalent to a version 1/2 manifest (modules, shapes, values, resized)."""
    edits: list[dict] = []
    for entry in sorted(manifest.get("modules", []), key=lambda e: e["path"].count(".")):
        edits.append({"op": "module", "path": entry["path"], "type": entry["type"],
                      "config": entry["config"]})
    for entry in manifest.get("shapes", []):
        edits.append({"op": "module", "path": entry["path"], "layer": entry["type"],
                      "attrs": entry["attrs"]})
    for entry in manifest.get("values", []):
        edits.append({"op": "value", **entry})
    for entry in manifest.get("resized", []):
        edits.append({"op": "tensor", "path": entry.get("path"), "name": entry.get("name"),
                      "kind": "legacy_resize", "shape": entry.get("shape")})
    return edits
