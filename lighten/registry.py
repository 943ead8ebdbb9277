"""The one table from recipe step name to (config type, handler).

A step is a plain function ``(model, config, ctx) -> model``. Handlers register themselves next
to their implementation with :func:`register_step`; :func:`load_builtin_steps` imports the
modules that hold them, so "where is prune.magnitude implemented?" is answered by a search.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lighten.errors import RecipeError, did_you_mean


@dataclass(frozen=True)
class StepSpec:
    name: str
    config_type: type[BaseModel]
    apply: Callable[..., Any]
    summary: str


STEPS: dict[str, StepSpec] = {}

# Modules that define built-in steps. Imported lazily so `import lighten` stays light.
_BUILTIN_STEP_MODULES = (
    "lighten.prune.magnitude",
    "lighten.prune.structured",
    "lighten.prune.nm",
    "lighten.prune.l1",
    "lighten.prune.layers",
    "lighten.prune.heads",
    "lighten.quant.ptq",
    "lighten.quant.dynamic",
    "lighten.quant.weight_only",
    "lighten.quant.qat",
    "lighten.quant.mixed",
)


def register_step(name: str, config_type: type[BaseModel]):
    """Decorator: make ``fn(model, config, ctx) -> model`` available as recipe step ``name``."""

    def decorate(fn):
        if name in STEPS and STEPS[name].apply is not fn:
            raise RuntimeError(f"step {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        STEPS[name] = StepSpec(name, config_type, fn, summary)
        return fn

    return decorate


def load_builtin_steps() -> dict[str, StepSpec]:
    for module in _BUILTIN_STEP_MODULES:
        importlib.import_module(module)
    return STEPS


def get_step(name: str) -> StepSpec:
    steps = load_builtin_steps()
    if name not in steps:
        known = ", ".join(sorted(steps))
        raise RecipeError(f"unknown step {name!r}; known steps: {known}"
                          f"{did_you_mean(name, steps)}")
    return steps[name]
