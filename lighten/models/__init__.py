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

__all__ = ["ZOO", "ModelSpec", "build_model", "example_inputs", "load_weights",
           "read_state_dict", "shipped_checkpoint"]

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
    input_shape: list[int] | None = Field(None, description="required with python")
    weights: str | None = Field(None, description=".safetensors, or .pt/.pth (weights only)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the factory")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.zoo is None) == (self.python is None):
            raise ValueError("model needs exactly one of 'zoo' (e.g. lenet5) or 'python' "
                             "('file.py:factory')")
        if self.python is not None and self.input_shape is None:
            raise ValueError("model.python needs model.input_shape, e.g. [1, 28, 28]")
        return self


def build_model(spec: ModelSpec, *, input_shape, num_classes: int,
                classes_from: str = "the data") -> nn.Module:
    """Build (and load weights into) the model; check it maps the input to (N, num_classes).

    ``classes_from`` says where ``num_classes`` came from, for the mismatch message.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if spec.zoo is not None:
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
        try:
            model = factory(**spec.kwargs)
        except Exception as exc:  # user code
            raise ModelError(f"model factory {spec.python!r} raised "
                             f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelError(f"model factory {spec.python!r} returned {type(model).__name__}; "
                             "it must return a torch.nn.Module")
    if spec.weights is not None:
        load_weights(model, spec.weights)
    _check_output(model, input_shape, num_classes, spec.zoo or spec.python, classes_from)
    return model


def _check_output(model: nn.Module, input_shape, num_classes: int, name: str,
                  classes_from: str = "the data") -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # a wrong shape fails somewhere inside the user's layers
        raise ModelError(f"model {name!r} cannot run on inputs of shape {list(input_shape)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model {name!r} returns a {type(out).__name__}, expected one logits "
                         f"tensor (batch, {num_classes}); make forward return only the logits")
    if tuple(out.shape) != (2, num_classes):
        raise ModelError(f"model {name!r} returns {tuple(out.shape)} for a batch of 2, expected "
                         f"logits (2, {num_classes}); match num_classes to {classes_from}")


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
