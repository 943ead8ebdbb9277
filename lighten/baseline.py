"""The recipe's baseline model: built and checked against the data, then given its weights
(the recipe's, the zoo's shipped checkpoint, the cache) or trained in the output folder with its
state checkpointed at each epoch end, so an interrupted training resumes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lighten.errors import ModelError
from lighten.recipe import Recipe
from lighten.run_folder import BASELINE_CHECKPOINT


@dataclass
class Prepared:
    data: object
    model: nn.Module
    baseline_source: str | None  # None: the baseline is trained in the output folder
    baseline_seconds: float
    baseline_peak_mib: float | None = None  # resident-memory peak while the baseline trained


def prepare(recipe: Recipe) -> Prepared:
    from lighten.data import load_data

    torch.manual_seed(recipe.seed)
    data = load_data(recipe.data)
    model = build(recipe, data)
    start = time.perf_counter()
    source = load_baseline(model, recipe, data)
    return Prepared(data, model, source, time.perf_counter() - start)


def build(recipe: Recipe, data) -> nn.Module:
    from lighten.models import build_model

    spec_shape = getattr(recipe.model, "input_shape", None)
    if spec_shape and tuple(spec_shape) != tuple(data.input_shape):
        raise ModelError(f"model.input_shape {list(spec_shape)} does not match the data's "
                         f"{list(data.input_shape)}; fix model.input_shape or choose other data")
    # user data has as many classes as its largest label + 1: say so, a stray label is common
    source = (f"the data (its largest label is {data.num_classes - 1}, so {data.num_classes} "
              "classes; labels must run from 0 to classes - 1)"
              if recipe.data.python else "the data")
    # build_model runs the task's example inputs through the model and checks the outputs
    # (task.check_outputs: (2, classes) logits, or (2, T, V) for a language model)
    model = build_model(recipe.model, input_shape=tuple(data.input_shape),
                        num_classes=data.num_classes, classes_from=source, task=data.task)
    return model.eval()


def load_baseline(model: nn.Module, recipe: Recipe, data) -> str | None:
    """Weights from the recipe, else the zoo's shipped checkpoint, else the cache; None when
    the baseline must be trained (:func:`train_baseline`, once the output folder is set up)."""
    from lighten.models import load_weights, shipped_checkpoint

    if recipe.model.weights:  # build_model loaded them (a lighten artifact's model included)
        return f"weights {recipe.model.weights}"
    if getattr(recipe.model, "hf", None) and not data.task.trains_pretrained:
        return f"pretrained weights of hf {recipe.model.hf}"  # used as loaded, never trained
    if recipe.model.zoo:
        shipped = shipped_checkpoint(recipe.model.zoo, data.name)
        if shipped is not None:
            load_weights(model, shipped)
            return f"shipped checkpoint {shipped.name}"
    cached = cache_path(recipe)
    if cached.is_file():
        load_weights(model, cached)
        return f"cached checkpoint {cached}"
    return None


def train_baseline(prepared: Prepared, recipe: Recipe, out: Path, *, progress: bool) -> None:
    """Train the baseline, its state checkpointed at each epoch end in OUTPUT/BASELINE_CHECKPOINT
    so that ``--resume`` after an interrupt continues from the last finished epoch (to the same
    weights as an uninterrupted training); then cache it and drop the checkpoint."""
    from lighten import train_state
    from lighten.memory import PeakMemory

    model, data = prepared.model, prepared.data
    cfg = recipe.train.model_copy(update={"seed": recipe.seed})
    checkpoint = out / BASELINE_CHECKPOINT
    meta = train_state.read_meta(checkpoint)
    key = train_state.state_key(model, cfg.model_dump(), len(data.train))
    resumed = (f", continued after epoch {meta['epoch'] + 1}"
               if meta and meta.get("key") == key else "")
    start = time.perf_counter()
    with PeakMemory() as peak:
        # the task's own fit (default: train on its loss; a text classifier fits its head first)
        data.task.fit_baseline(model, data.train, cfg, progress=progress, checkpoint=checkpoint)
    prepared.baseline_peak_mib = peak.peak_mb
    model.eval()
    cached = cache_path(recipe)
    save_weights(model, cached)
    checkpoint.unlink(missing_ok=True)
    prepared.baseline_seconds = time.perf_counter() - start
    prepared.baseline_source = (f"trained here ({recipe.train.epochs} epochs{resumed}), cached "
                                f"at {cached}")


def cache_path(recipe: Recipe) -> Path:
    from lighten.provenance import recipe_hash

    key = recipe_hash({"model": recipe.model.model_dump(), "data": recipe.data.model_dump(),
                       "train": recipe.train.model_dump(), "seed": recipe.seed,
                       "code": [file_digest(recipe.model.python),
                                file_digest(recipe.data.python)]})
    root = Path(os.environ.get("LIGHTEN_CACHE", Path.home() / ".cache" / "lighten"))
    label = recipe.model.zoo or "model"
    return root / "baselines" / f"{label}-{key}.safetensors"


def file_digest(reference: str | None) -> str | None:
    """Hash of the user's code behind ``file.py:function``: editing the model retrains it."""
    if not reference:
        return None
    import hashlib

    path = Path(reference.rpartition(":")[0] or reference)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)
