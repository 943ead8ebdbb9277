"""The names ``lighten`` exports stay what its docs say, whatever was imported before: no
submodule may share a name with an exported function (importing it would replace the function
with the module on the package)."""

from __future__ import annotations

import importlib
import pkgutil

import lighten


def test_every_export_resolves_to_its_object_after_every_submodule_is_imported():
    for info in pkgutil.walk_packages(lighten.__path__, "lighten."):
        if ".llm." in info.name or info.name.startswith("lighten.cli"):
            continue  # optional extras; none is named like an export
        try:
            importlib.import_module(info.name)
        except ImportError:
            continue  # an optional dependency that is not installed
    for name, module in lighten._EXPORTS.items():
        assert getattr(lighten, name) is getattr(importlib.import_module(module), name), name
    assert callable(lighten.train) and callable(lighten.evaluate)


def test_no_submodule_is_named_like_an_export():
    submodules = {info.name for info in pkgutil.iter_modules(lighten.__path__)}
    assert not submodules & set(lighten._EXPORTS)
