"""The model zoo, user models from ``file.py:factory``, and safe weight loading.

Zoo models are built from plain ``nn.Module`` layers (``nn.ReLU``, ``nn.Flatten``, ...) so they
trace with ``torch.fx``, export to ONNX and can be pruned structurally.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from lighten.errors import ModelError, did_you_mean
from lighten.models.checkpoint import load_weights, read_state_dict
from lighten.models.lenet import lenet5, lenet300
from lighten.models.mobilenet import mobilenetv2
from lighten.models.resnet import resnet20
from lighten.models.vgg import vgg_small
from lighten.step import StrictModel

__all__ = ["ZOO", "ModelSpec", "build_model", "check_model_outputs", "example_inputs",
           "load_weights", "read_state_dict", "shipped_checkpoint"]

# name -> factory(num_classes=10, input_shape=(1, 28, 28)) -> nn.Module
ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "lenet300": lenet300,
    "resnet20": resnet20,
    "mobilenetv2": mobilenetv2,
    "vgg_small": vgg_small,
}

WEIGHTS_DIR = Path(__file__).parent / "weights"


class ModelSpec(StrictModel):
    """The ``model:`` block of a recipe: a zoo name or a ``python: file.py:factory``."""

    zoo: str | None = None
    python: str | None = Field(None, description="'file.py:factory' returning an nn.Module")
    hf: str | None = Field(None, description="pretrained transformers model from local files: "
                           "a folder, a .gguf file or an installed package (lighten.llm)")
    input_shape: list[int] | None = Field(None, description="required with python")
    weights: str | None = Field(None, description=".safetensors, or .pt/.pth (weights only)")
    trust_weights: bool | None = Field(None, description="true: unpickle .pt/.pth weights in "
                                       "full, which runs any code in the file (your own only)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the factory")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if sum(x is not None for x in (self.zoo, self.python, self.hf)) != 1:
            raise ValueError("model needs exactly one of 'zoo' (e.g. lenet5), 'python' "
                             "('file.py:factory') or 'hf' (a local transformers model)")
        if self.python is not None and self.input_shape is None:
            raise ValueError("model.python needs model.input_shape, e.g. [1, 28, 28]")
        return self


def build_model(spec: ModelSpec, *, input_shape, num_classes: int,
                classes_from: str = "the data", task=None) -> nn.Module:
    """Build (and load weights into) the model; check its outputs with ``task.check_outputs``
    (default: classification, logits (N, num_classes)).

    ``classes_from`` says where ``num_classes`` came from, for the mismatch message. A
    ``python:`` factory is called with ``model.kwargs`` plus the facts the task offers
    (``task.factory_kwargs()``: ``vocab_size`` and ``seq_len`` for a language model) that its
    signature accepts and the recipe does not set, e.g. ``def build(vocab_size, seq_len, **kw)``.
    """
    from lighten.task import ClassificationTask

    input_shape = tuple(int(d) for d in input_shape)
    task = task if task is not None else ClassificationTask(input_shape, num_classes)
    if spec.hf is not None:  # a pretrained transformers model (lighten.llm, the llm extra)
        from lighten.llm.sources import build_hf

        model = build_hf(spec.hf, task=task, options=spec.kwargs)
    elif spec.zoo is not None:
        if spec.zoo not in ZOO:
            raise ModelError(f"unknown zoo model {spec.zoo!r}; known: {', '.join(ZOO)}"
                             f"{did_you_mean(spec.zoo, ZOO)}")
        factory = ZOO[spec.zoo]
        try:
            model = factory(num_classes=num_classes, input_shape=input_shape, **spec.kwargs)
        except TypeError as exc:
            raise ModelError(f"zoo model {spec.zoo!r} rejected kwargs {spec.kwargs}: {exc}") \
                from exc
    else:
        if tuple(spec.input_shape) != input_shape:
            raise ModelError(f"model.input_shape {list(spec.input_shape)} differs from the "
                             f"data's {list(input_shape)}; make them agree")
        from lighten.data.pyref import load_callable

        factory = load_callable(spec.python, error=ModelError, what="model")
        kwargs = {**_accepted(factory, task.factory_kwargs()), **spec.kwargs}
        try:
            model = factory(**kwargs)
        except Exception as exc:  # user code
            raise ModelError(f"model factory {spec.python!r} raised "
                             f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelError(f"model factory {spec.python!r} returned {type(model).__name__}; "
                             "it must return a torch.nn.Module")
    if spec.weights is not None:  # a lighten artifact may give a pruned/quantized model
        model = load_weights(model, spec.weights, trust=bool(spec.trust_weights))
    check_model_outputs(model, task, name=f"model {spec.zoo or spec.python or spec.hf!r}",
                        hint=f"; match num_classes to {classes_from}")
    return model


def _accepted(factory: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    """The ``offered`` keyword arguments ``factory``'s signature takes (all with ``**kw``)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(offered)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in names}


def check_model_outputs(model: nn.Module, task, *, name: str = "the model",
                        hint: str = "") -> None:
    """Run ``model`` on the task's example inputs at batch 2 (eval mode, no grad) and check the
    outputs with ``task.check_outputs``: one ModelError line when it fails or the shape is off."""
    task.check_outputs(check_model_runs(model, task, name=name), 2, name=name, hint=hint)


def check_model_runs(model: nn.Module, task, *, name: str = "the model", fix: str = ""):
    """``model``'s outputs on the task's example inputs at batch 2 (eval mode, no grad); a
    model that cannot take them (a wrong shape fails somewhere inside the user's layers) is one
    ModelError line naming the shapes, then ``fix``."""
    was_training = model.training
    model.eval()
    inputs = task.example_inputs(2)
    try:
        with torch.inference_mode():
            return model(*inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the user's layers raise
        shape = list(inputs[0].shape[1:]) if len(inputs) == 1 else \
            [list(x.shape[1:]) for x in inputs]
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"{name} cannot run on inputs of shape {shape}: "
                         f"{type(exc).__name__}: {first}{fix}") from exc
    finally:
        model.train(was_training)


def shipped_checkpoint(zoo_name: str, data_name: str) -> Path | None:
    """The pre-trained weights shipped with lighten for this zoo model and dataset, if any."""
    path = WEIGHTS_DIR / f"{zoo_name}-{data_name}.safetensors"
    return path if path.is_file() else None


def example_inputs(name: str = "lenet5", *, batch: int = 2, input_shape=(1, 28, 28),
                   seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A fresh zoo model and a deterministic random batch for it: handy in tests and docs."""
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}"
                         f"{did_you_mean(name, ZOO)}")
    g = torch.Generator().manual_seed(seed)
    return ZOO[name](input_shape=tuple(input_shape)), torch.randn(batch, *input_shape,
                                                                   generator=g)
