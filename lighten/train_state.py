"""Resumable training: :func:`lighten.training.train`'s state at an epoch end, in one file.

One ``.safetensors`` file, written atomically (temp file + ``os.replace``), nothing pickled:

    model.<name>          the model's state dict (parameters and buffers)
    optim.<i>.<key>       each tensor of the optimizer's per-parameter state (Adam's exp_avg, ...)
    rng.torch             the global torch RNG (dropout)
    rng.<generator>       the data loader's shuffle generator and the augmentation generator

and in the metadata (JSON under ``lighten_train``): the epoch and step counters, the losses so
far, the optimizer's param groups and non-tensor state, the scheduler position and a key (the
training config, dataset size and model shapes) that must match for the file to be used. A
resumed training takes exactly the steps the uninterrupted one would have taken.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

FORMAT = "lighten-train-state"
VERSION = 1
_META = "lighten_train"


def state_key(model: nn.Module, cfg_dump: dict, samples: int) -> str:
    """What a checkpoint must match to continue this training: config, data size, shapes."""
    shapes = [[name, list(t.shape)] for name, t in model.state_dict().items()
              if isinstance(t, torch.Tensor)]
    text = json.dumps({"cfg": cfg_dump, "samples": samples, "shapes": shapes}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_train_state(path: str | os.PathLike, *, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler, epoch: int, step: int,
                     losses: list[float], generators: dict[str, torch.Generator],
                     key: str) -> None:
    """Write the state after ``epoch`` (0-based, finished) and ``step`` optimizer steps."""
    from safetensors.torch import save_file

    tensors = {f"model.{name}": t.detach().cpu().clone().contiguous()
               for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    opt = optimizer.state_dict()
    plain: dict[str, dict] = {}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().clone().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    for name, generator in generators.items():
        tensors[f"rng.{name}"] = generator.get_state()
    meta = {"format": FORMAT, "version": VERSION, "key": key, "epoch": epoch, "step": step,
            "losses": losses, "param_groups": opt["param_groups"], "optim_plain": plain,
            "scheduler_last_epoch": scheduler.last_epoch}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})
    os.replace(tmp, path)


def read_meta(path: str | os.PathLike) -> dict | None:
    """The checkpoint's metadata (epoch, step, key, ...); None when absent or not ours."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META, "null"))
    except Exception:  # safetensors raises its own error types for a damaged header
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
            meta.get("version") != VERSION:
        return None
    return meta


def load_train_state(path: str | os.PathLike, *, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler,
                     generators: dict[str, torch.Generator], key: str) -> dict | None:
    """Restore a checkpoint written by :func:`save_train_state` for the same ``key``; returns
    its metadata (``epoch``: the last finished epoch, ``step``, ``losses``) or None (no usable
    file: training starts from the beginning)."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    if meta is None or meta.get("key") != key:
        return None
    try:
        tensors = load_file(str(path))
    except Exception:  # a damaged body: start over rather than resume from garbage
        return None
    # the key covers every tensor's name and shape; non-tensor extra state is not stored
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()
                           if k.startswith("model.")}, strict=False)
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["optim_plain"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, field = name.split(".", 2)
            state.setdefault(int(index), {})[field] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.last_epoch = int(meta["scheduler_last_epoch"])
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    torch.set_rng_state(tensors["rng.torch"])
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
    return meta
