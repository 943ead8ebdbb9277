"""Resolve a ``"file.py:function"`` reference by importing the file by path.

Used by ``data: {python: ...}`` and ``model: {python: ...}``. The file is user code the user
asked us to run, so importing it is expected; every failure names the file and what to fix.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from lighten.errors import LightenError


def load_callable(ref: str, *, error: type[LightenError], what: str) -> Callable:
    """Return the callable named by ``ref`` (``"path/to/file.py:name"``)."""
    path_text, sep, name = ref.rpartition(":")
    if not sep or not path_text or not name:
        raise error(f"{what} reference {ref!r} is not 'file.py:function'; write it like that")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise error(f"{what} file {str(path)!r} does not exist; fix the path in {ref!r}")
    # A unique module name per file so two user files called model.py do not collide.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"lighten_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise error(f"{what} file {str(path)!r} cannot be imported; it must be a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # user code: report any failure as one line
        sys.modules.pop(module_name, None)
        raise error(f"importing {what} file {str(path)!r} failed: "
                    f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise error(f"{what} file {str(path)!r} has no function {name!r}; "
                    f"define it or fix the name in {ref!r}")
    if not callable(fn):
        raise error(f"{name!r} in {str(path)!r} is not callable; point {ref!r} at a function")
    return fn
