"""Turn the MODEL argument of ``check``/``measure``/``export`` into a ready nn.Module.

MODEL is one of: a zoo name (``lenet5``; shipped weights when lighten has them), a lighten
artifact (``runs/demo/stages/02-quant.ptq.safetensors``; the manifest knows the shapes), or a
user factory ``file.py:factory`` (needs ``--input-shape``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_CHOICES = ("fashion-mnist", "digits", "synthetic")
_DATA_SHAPES = {"fashion-mnist": (1, 28, 28), "digits": (1, 8, 8)}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> (1, 28, 28); argparse turns the error into a usage message."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write C,H,W like 1,28,28")
    return shape


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="zoo name (lenet5, ...), a lighten .safetensors artifact, "
                             "or file.py:factory")
    parser.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                        help="per-sample input shape (required for file.py:factory)")
    parser.add_argument("--weights", metavar="FILE",
                        help="weights to load (.safetensors, or .pt/.pth read weights-only)")
    parser.add_argument("--num-classes", type=positive_int, metavar="N",
                        help="classes of a zoo model (default 10); inferred for file.py:factory")


@dataclass
class ResolvedModel:
    model: Any  # nn.Module, in eval mode
    input_shape: tuple[int, ...]
    num_classes: int
    label: str  # what to call it in tables
    spec: dict = field(default_factory=dict)  # ModelSpec as a dict, recorded in artifacts
    artifact: Path | None = None  # set when MODEL was an artifact file


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def default_data(input_shape: tuple[int, ...]) -> str:
    """The built-in dataset whose samples have this shape; synthetic when none does."""
    for name, shape in _DATA_SHAPES.items():
        if tuple(input_shape) == shape:
            return name
    return "synthetic"


def resolve_model(ref: str, *, input_shape: tuple[int, ...] | None = None,
                  weights: str | None = None, num_classes: int | None = None,
                  data: str | None = None,
                  warn: Callable[[str], None] = _stderr_warning) -> ResolvedModel:
    """Build the model MODEL names; every mistake is a one-line ModelError/CheckpointError."""
    from lighten.errors import ModelError

    path_part, sep, _ = ref.rpartition(":")
    if sep and path_part.endswith(".py"):
        return _from_python(ref, input_shape, weights, num_classes)
    if ref.endswith(".safetensors") or Path(ref).is_file():
        return _from_artifact(ref, input_shape, weights)
    from lighten.errors import did_you_mean
    from lighten.models import ZOO

    if ref in ZOO:
        return _from_zoo(ref, input_shape, weights, num_classes, data, warn)
    raise ModelError(f"unknown model {ref!r}: not a zoo name ({', '.join(ZOO)}), not an "
                     "existing .safetensors artifact, not 'file.py:factory'"
                     + did_you_mean(ref, ZOO))


def _from_zoo(name, input_shape, weights, num_classes, data, warn) -> ResolvedModel:
    from lighten.models import ModelSpec, build_model, load_weights, shipped_checkpoint

    shape = tuple(input_shape or _DATA_SHAPES.get(data or "", (1, 28, 28)))
    data_name = data or default_data(shape)
    classes = num_classes or 10
    spec = ModelSpec(zoo=name, weights=weights)
    model = build_model(spec, input_shape=shape, num_classes=classes)
    label = name
    if weights is None:
        shipped = shipped_checkpoint(name, data_name)
        if shipped is not None:
            load_weights(model, shipped)
            label = f"{name} ({shipped.name})"
        else:
            warn(f"no shipped checkpoint for {name} on {data_name}; using random weights "
                 "(pass --weights FILE for a trained model)")
    return ResolvedModel(model.eval(), shape, classes, label,
                         spec.model_dump(exclude_none=True))


def _from_artifact(ref, input_shape, weights) -> ResolvedModel:
    from lighten.errors import CheckpointError, ModelError

    path = Path(ref)
    if not path.is_file():
        raise CheckpointError(f"artifact {ref!r} does not exist; check the path (stages are "
                              "saved under OUTPUT/stages/)")
    if path.suffix != ".safetensors":
        raise ModelError(f"{ref!r} is a bare checkpoint without an architecture; use "
                         "`ZOO_NAME --weights FILE` or `file.py:factory --weights FILE`")
    if weights is not None:
        raise ModelError(f"{ref!r} is a lighten artifact that holds its own weights; "
                         "drop --weights")
    from lighten.artifact import load_artifact

    model, manifest = load_artifact(path)
    shape = tuple(manifest.get("input_shape") or ())
    if not shape:
        raise CheckpointError(f"{ref!r} has no input_shape in its manifest; is it a lighten "
                              "artifact? Load plain weights with `ZOO_NAME --weights FILE`")
    if input_shape is not None and tuple(input_shape) != shape:
        raise ModelError(f"--input-shape {list(input_shape)} differs from the artifact's "
                         f"{list(shape)}; drop --input-shape")
    return ResolvedModel(model.eval(), shape, int(manifest.get("num_classes") or 0),
                         path.stem, dict(manifest.get("model_spec") or {}), artifact=path)


def _from_python(ref, input_shape, weights, num_classes) -> ResolvedModel:
    import torch
    from torch import nn

    from lighten.data.pyref import load_callable
    from lighten.errors import ModelError
    from lighten.models import load_weights

    if input_shape is None:
        raise ModelError(f"{ref!r} needs the input shape: add --input-shape C,H,W "
                         "(e.g. 1,28,28)")
    factory = load_callable(ref, error=ModelError, what="model")
    try:
        model = factory()
    except Exception as exc:  # user code
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"model factory {ref!r} raised {type(exc).__name__}: {first}") \
            from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {ref!r} returned {type(model).__name__}; "
                         "it must return a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # a wrong shape fails somewhere inside the user's layers
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"model {ref!r} cannot run on input shape {list(input_shape)} "
                         f"({type(exc).__name__}: {first}); check --input-shape") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {ref!r} returns {got}; lighten needs logits of shape "
                         "(batch, classes)")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelError(f"model {ref!r} returns {out.shape[1]} classes, not "
                         f"--num-classes {num_classes}; fix one of them")
    spec = {"python": ref, "input_shape": list(input_shape)}
    if weights is not None:
        spec["weights"] = weights
    return ResolvedModel(model, tuple(input_shape), int(out.shape[1]), ref, spec)


def load_data_for(name: str, resolved):
    """The dataset ``name`` (fashion-mnist, digits, synthetic), checked against the model's
    input shape and class count so a mismatch is one clear line, not a crash mid-run."""
    from lighten.data import DataSpec, load_data
    from lighten.errors import DataError

    if name == "synthetic":
        spec = DataSpec(name="synthetic", input_shape=list(resolved.input_shape),
                        num_classes=max(resolved.num_classes, 2))
    else:
        spec = DataSpec(name=name)
    bundle = load_data(spec)
    if tuple(bundle.input_shape) != tuple(resolved.input_shape):
        raise DataError(f"{name} samples are {list(bundle.input_shape)} but the model takes "
                        f"{list(resolved.input_shape)}; pick matching --data or --input-shape")
    if resolved.num_classes and bundle.num_classes != resolved.num_classes:
        raise DataError(f"{name} has {bundle.num_classes} classes but the model outputs "
                        f"{resolved.num_classes}; pick matching --data or --num-classes")
    return bundle
