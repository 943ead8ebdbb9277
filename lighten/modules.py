"""The registry of custom ``nn.Module`` classes that may appear in a saved artifact.

An artifact never stores code. For a custom module (e.g. a fake-quant conv) it stores a type key
and a JSON config; the loader looks the key up here and calls ``cls.from_artifact(config)`` to
get an empty module of the right shapes, then loads its tensors. So only classes that registered
themselves can ever be instantiated by a load — nothing from the file is executed or unpickled.

A registered class provides::

    def artifact_config(self) -> dict                          # JSON-able constructor facts
    @classmethod
    def from_artifact(cls, config: dict) -> nn.Module          # empty module, right shapes
"""

from __future__ import annotations

import importlib
import re

from torch import nn

from lighten.errors import CheckpointError, ModelError

_TYPES: dict[str, type[nn.Module]] = {}
_KEYS: dict[type[nn.Module], str] = {}

_MODULE_NAME = re.compile(r"^lighten(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def module_type_key(cls: type[nn.Module]) -> str:
    """The stable key of ``cls``: its own ``artifact_type`` or ``"module.path:QualName"``."""
    explicit = cls.__dict__.get("artifact_type")  # not inherited: a subclass is its own type
    if explicit is not None:
        return str(explicit)
    return f"{cls.__module__}:{cls.__qualname__}"


def register_module_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: allow ``cls`` in artifacts under :func:`module_type_key`."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_type expects an nn.Module subclass, got {cls!r}")
    for method in ("artifact_config", "from_artifact"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(f"{cls.__qualname__} must define {method}() to be saved in artifacts")
    key = module_type_key(cls)
    previous = _TYPES.get(key)
    # The same class body imported twice (a reload, or a user model file that lighten imports
    # by path) re-registers; instances of both class objects keep saving under the key.
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise RuntimeError(f"module type {key!r} registered twice ({previous!r} and {cls!r})")
    _TYPES[key] = cls
    _KEYS[cls] = key
    return cls


def registered_key(module: nn.Module) -> str | None:
    """The registry key of ``module``'s exact class, or None for ordinary modules."""
    return _KEYS.get(type(module))


def get_module_type(key: str) -> type[nn.Module]:
    """The class registered under ``key``; :class:`CheckpointError` when none is."""
    if key not in _TYPES:
        _import_provider(key)
    if key not in _TYPES:
        from lighten.provenance import versions

        known = ", ".join(sorted(_TYPES)) or "none"
        raise CheckpointError(
            f"unknown module type {key!r} in artifact (this is lighten {versions()['lighten']}; "
            f"registered: {known}); it needs a newer lighten or the extra/package that defines "
            "it — install that, or import the module that registers it before loading"
        )
    return _TYPES[key]


def _import_provider(key: str) -> None:
    """Import lighten's own module named in a default key, so its classes self-register.

    Only modules inside the installed ``lighten`` package are ever imported this way.
    """
    module_name = key.split(":", 1)[0]
    if ":" not in key or not _MODULE_NAME.match(module_name):
        return
    try:
        importlib.import_module(module_name)
    except ImportError:
        pass  # reported by the caller as an unknown type


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is ``model``; Sequential indices like ``"0"``)."""
    module = model
    if not path:
        return module
    walked = []
    for part in path.split("."):
        children = module._modules
        if part not in children or children[part] is None:
            where = ".".join(walked) or "<root>"
            names = ", ".join(k for k, v in children.items() if v is not None) or "none"
            raise ModelError(
                f"no submodule {path!r} in {type(model).__name__}: {where} "
                f"({type(module).__name__}) has no child {part!r} (children: {names})"
            )
        module = children[part]
        walked.append(part)
    return module


def set_submodule(model: nn.Module, path: str, new_module: nn.Module) -> None:
    """Replace the existing submodule at dotted ``path`` with ``new_module``."""
    if not path:
        raise ModelError("cannot replace the root module with set_submodule; use the new module")
    if not isinstance(new_module, nn.Module):
        raise ModelError(f"set_submodule({path!r}) needs an nn.Module, got {type(new_module)}")
    parent_path, _, name = path.rpartition(".")
    get_submodule(model, path)  # one clear error if it does not exist
    parent = get_submodule(model, parent_path)
    parent._modules[name] = new_module


def require_modules(model: nn.Module, names, *, key: str) -> None:
    """Fail with one clear line when a recipe names (under ``key``) a module the model lacks."""
    known = {name for name, _ in model.named_modules()}
    unknown = [n for n in names if n not in known]
    if unknown:
        from lighten.errors import UnsupportedError, did_you_mean

        hint = did_you_mean(unknown[0], known - {""})
        raise UnsupportedError(f"{key}: no module named {unknown[0]!r} in the model"
                               + (hint or f" (names look like {sorted(known - {''})[:3]})"))


def bake_parametrizations_(model: nn.Module) -> list[str]:
    """Fold every ``torch.nn.utils.parametrize`` parametrization (weight_norm, spectral_norm,
    orthogonal) into a plain tensor, in place: compression works on the weight a layer computes
    with, which only then is its ``weight`` Parameter. Returns "module.tensor" per fold."""
    from torch.nn.utils import parametrize

    baked = []
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            for tensor in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                baked.append(f"{name}.{tensor}" if name else tensor)
    return baked
