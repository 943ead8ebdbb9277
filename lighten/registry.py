"""The one table from recipe step name to (config type, handler), and back from config type.

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
    # config -> what data the step needs with this config ("calibration inputs"), or None
    needs_data: Callable[[Any], str | None] | None = None
    # the step leaves integer/fake-quantized layers that no later step can work on
    quantizes: bool = False
    # the step changes how the artifact stores tensors, not the model (encode.entropy): it is a
    # recipe's very last step and may follow a quantizing one
    storage_only: bool = False

    def data_needed(self, config: BaseModel) -> str | None:
        """What data ``config`` makes this step read (None: it runs on the model alone)."""
        own = self.needs_data(config) if self.needs_data else None
        finetune = getattr(config, "finetune", None)
        tuning = ("labelled training data for finetune:"  # unless the step already reads it
                  if finetune is not None and finetune.epochs
                  and not (own or "").startswith("labelled training data") else None)
        return " and ".join(dict.fromkeys(x for x in (own, tuning) if x)) or None


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
    "lighten.distill.step",
    "lighten.dynamic.early_exit",
    "lighten.dynamic.gating",
    "lighten.dynamic.slimmable",
    "lighten.dynamic.any_precision",
    "lighten.arch.reorganize",
    "lighten.arch.separable",
    "lighten.arch.nas",
    "lighten.lowrank",  # lowrank.svd, lowrank.tucker, lowrank.cp
    "lighten.share.kmeans",
    "lighten.share.pq",
    "lighten.share.channels",
    "lighten.share.tie",
    "lighten.encode.entropy",
    "lighten.llm.steps",  # llm.weight_only, llm.smoothquant, llm.sparsegpt, llm.wanda
    "lighten.llm.encoder",  # llm.encoder_prune (heads, FFN neurons, layers of an encoder)
    "lighten.llm.decoder_prune",  # llm.decoder_prune (GQA heads, FFN neurons, layers of an LLM)
)


def register_step(name: str, config_type: type[BaseModel], *,
                  needs_data: Callable[[Any], str | None] | None = None,
                  quantizes: bool = False, storage_only: bool = False):
    """Decorator: make ``fn(model, config, ctx) -> model`` available as recipe step ``name``
    and as ``lighten.compress(model, config_type(...))``. Each step has its own config type
    (the verb dispatches on it). ``needs_data(config)`` says what data the step reads with that
    config, e.g. ``"calibration inputs"``, or None; ``finetune:`` adds labelled training data.
    ``quantizes``: the step's output is quantized, so it must be a recipe's last step;
    ``storage_only``: the step changes only how the artifact stores tensors (last of all)."""

    def decorate(fn):
        if name in STEPS and STEPS[name].apply is not fn:
            raise RuntimeError(f"step {name!r} registered twice")
        for other in STEPS.values():
            if other.config_type is config_type and other.name != name:
                raise RuntimeError(f"steps {other.name!r} and {name!r} share the config type "
                                   f"{config_type.__name__}; give {name!r} its own subclass")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        STEPS[name] = StepSpec(name, config_type, fn, summary, needs_data, quantizes,
                               storage_only)
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


def step_for_config(config: BaseModel) -> StepSpec:
    """The step whose config type ``config`` is (its nearest registered base class for a user
    subclass): how ``lighten.compress`` dispatches."""
    steps = load_builtin_steps()
    by_type = {spec.config_type: spec for spec in steps.values()}
    for cls in type(config).__mro__:
        if cls in by_type:
            return by_type[cls]
    raise RecipeError(f"{type(config).__name__} is not the config of any registered step; pass "
                      "one of " + ", ".join(sorted(s.config_type.__name__ for s in steps.values()))
                      + " (or a mapping {step name: options})")
