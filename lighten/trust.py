"""Which code a model file may make us run.

A lighten artifact can name a ``python:`` factory (its own ``model_spec``, or a dynamic
wrapper's ``backbone_spec`` in the edit log) and the keyword arguments to call it with. Both
come from the file, so a hostile file could name any function on disk -- ``subprocess.run``
with ``shell: true`` -- and loading it would run that. Such code runs only when the caller
trusts the file (``load_artifact(..., trust=True)``, ``--trust``) or when this process has
imported that very file already and it is not part of Python or an installed package (a model
written and reloaded in one session adds no new code).
"""

from __future__ import annotations

import contextvars
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lighten.errors import UntrustedCodeError

_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("lighten_trusted_file",
                                                               default=False)


@contextmanager
def trusting(trust: bool) -> Iterator[None]:
    """Within the block, code named by the file being loaded may run when ``trust``."""
    token = _TRUSTED.set(bool(trust))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def ran_here(ref: str) -> bool:
    """Whether this process already imported the file ``ref`` (``file.py:function``) names,
    and it is not part of Python or an installed package: a library file, even one imported
    already (subprocess.py), never is -- its functions are the gadgets."""
    try:
        path = Path(ref.rpartition(":")[0]).expanduser().resolve()
        libraries = {Path(p).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")
                     if (p := sysconfig.get_paths().get(key))}
    except (OSError, ValueError, RuntimeError):
        return False
    if any(path.is_relative_to(lib) for lib in libraries):
        return False
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py"):
            try:
                if Path(file).resolve() == path:
                    return True
            except (OSError, ValueError, RuntimeError):
                continue
    return False


def check_code_allowed(ref: str, where: str, *, trust: bool | None = None) -> None:
    """Raise :class:`UntrustedCodeError` unless the ``python:`` reference ``ref`` that
    ``where`` names may run (``trust`` None: the enclosing :func:`trusting` block decides)."""
    trusted = _TRUSTED.get() if trust is None else trust
    if trusted or ran_here(ref):
        return
    raise UntrustedCodeError(
        f"{where} builds its model by running {ref!r} with arguments from the file; code named "
        f"by a model file is not run unless you trust it: pass --trust "
        f"(load_artifact(..., trust=True)) if you made it, or give the architecture yourself "
        f"(load_artifact(..., model=...), or a recipe's model: {{python: {ref}, weights: "
        f"<this file>}})")


def build_recorded_backbone(config: dict, what: str) -> nn.Module:
    """The model a dynamic wrapper's artifact config records (``backbone_spec``,
    ``input_shape``, ``num_classes``, ``task``), built like the artifact's own source: a
    ``python:`` spec only where :func:`check_code_allowed` permits; the caller's RNG kept."""
    from lighten.models import ModelSpec, build_model
    from lighten.task import task_from_dict

    spec = ModelSpec(**{k: v for k, v in config["backbone_spec"].items() if k != "weights"})
    if spec.python is not None:
        check_code_allowed(spec.python, f"a {what} in this artifact")
    task = task_from_dict(config["task"]) if config.get("task") else None
    with torch.random.fork_rng(devices=[]):
        return build_model(spec, input_shape=tuple(config["input_shape"]),
                           num_classes=config["num_classes"], task=task)
