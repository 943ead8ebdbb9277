"""Deploying a slimmable model: one plain ONNX model per width (``lighten export --width``),
each width's batch-1 latency on ONNX Runtime here, the widest width within a latency budget,
and the per-width breakdown the runner records for a ``dynamic.slimmable`` stage."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lighten.dynamic.slimmable import SlimmableModel, width_facts
from lighten.errors import UnsupportedError


def plain_width(model: nn.Module, width: float) -> nn.Module:
    """The plain model of ``width`` of a slimmable model; one clear error for anything else."""
    if not isinstance(model, SlimmableModel):
        raise UnsupportedError(f"--width needs a slimmable model (the artifact of a "
                               f"dynamic.slimmable stage), not {type(model).__name__}; export "
                               "it without --width")
    return model.at_width(width)


def export_width(model: SlimmableModel, width: float, path, *, inputs=None, sample_inputs=None,
                 metadata: dict | None = None, verify: bool = True):
    """Write the plain ONNX model of one width (``lighten export --width``), checked against
    the slimmable model run at that width."""
    from lighten.export import export_onnx

    plain = plain_width(model, width)
    check = export_onnx(plain, path, inputs=inputs or _specs(model), sample_inputs=sample_inputs,
                        metadata={**(metadata or {}), "lighten.width": str(float(width))},
                        verify=verify)
    return check


def _deployed(model: SlimmableModel, workdir: Path, inputs) -> dict[float, Path]:
    """Each width's plain ONNX file in ``workdir`` (width_<w>.onnx)."""
    import onnx

    from lighten.export import _torch_export

    workdir.mkdir(parents=True, exist_ok=True)
    files = {}
    for w in model.widths:
        path = workdir / f"width_{w:g}.onnx"
        onnx.save(_torch_export(model.at_width(w), inputs, 17), str(path))
        files[w] = path
    return files


def _specs(model: SlimmableModel, task=None):
    """The inputs: the given task's, else the recorded task's, else the input shape."""
    from lighten.task import InputSpec, task_from_dict

    if task is None and model.task:
        task = task_from_dict(model.task)
    if task is not None:
        return task.inputs

    if model.input_shape is None:
        raise UnsupportedError("the slimmable model does not record its input shape; pass "
                               "task= (or samples=)")
    return (InputSpec("input", tuple(model.input_shape)),)


def width_latency(model: SlimmableModel, *, samples: np.ndarray | None = None, task=None,
                  threads: int | None = None, rounds: int = 5, count: int = 200,
                  workdir=None) -> dict[float, dict]:
    """Batch-1 ONNX Runtime latency of each width on this machine: per width the median of
    ``rounds`` interleaved rounds' mean ms per sample over ``count`` samples (random inputs
    unless ``samples``), their IQR and the rounds."""
    from lighten.dynamic.runtime import _interleaved, _session_fn

    specs = _specs(model, task)
    if len(specs) != 1 or not specs[0].is_float:
        raise UnsupportedError("width latency is timed for one float input")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lighten-widths-"))
    files = _deployed(model, workdir, specs)
    if samples is None:
        samples = torch.randn(count, *specs[0].shape, generator=torch.Generator().manual_seed(0))
        samples = samples.numpy()
    one = [np.ascontiguousarray(samples[i:i + 1], dtype=np.float32)
           for i in range(min(count, len(samples)))]
    fns = {w: _session_fn(path, threads) for w, path in files.items()}
    return _interleaved(fns, one, rounds)


def pick_width(model: SlimmableModel, budget_ms: float, **kwargs) -> tuple[float, dict]:
    """(the widest width whose measured batch-1 latency here is within ``budget_ms``, every
    width's timing); UnsupportedError when even the narrowest is slower (it says by how much).
    ``kwargs`` go to :func:`width_latency`."""
    timing = width_latency(model, **kwargs)
    for w in sorted(timing, reverse=True):
        if timing[w]["median"] <= budget_ms:
            return w, timing
    narrow = min(timing)
    raise UnsupportedError(f"no width meets {budget_ms} ms per sample here: the narrowest "
                           f"({narrow:g}) takes {timing[narrow]['median']:.3f} ms")


def measure_widths(model: SlimmableModel, dataset, *, task=None, threads=None, compiled=None,
                   workdir=None, latency_samples: int = 300, rounds: int = 5
                   ) -> dict[str, Any]:
    """metrics.jsonl fields of a slimmable stage: ``macs`` of the deployed width and under
    ``dynamic`` per width its test accuracy (its own plain ONNX model on ONNX Runtime), MACs,
    parameters and batch-1 latency (all widths timed in the same interleaved rounds). The
    row's own latency is the runner's timing of the deployed width's model.onnx."""
    from torch.utils.data import DataLoader

    from lighten.dynamic.runtime import _interleaved, _session_fn

    specs = _specs(model, task)
    if len(specs) != 1 or not specs[0].is_float:
        raise UnsupportedError("a slimmable stage is measured for one float input")
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=512):
        xs.append(task.as_inputs(x)[0] if task is not None else x)
        ys.append(torch.as_tensor(y))
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lighten-widths-"))
    files = _deployed(model, workdir, specs)
    fns = {w: _session_fn(path, threads) for w, path in files.items()}
    facts = {f["width"]: f for f in width_facts(model, x_all[:1])}
    full = facts[model.widths[0]]["macs"]
    rows = []
    chunks = [x_all[i:i + 256].numpy() for i in range(0, len(x_all), 256)]
    for w, fn in fns.items():
        logits = torch.from_numpy(np.concatenate([np.asarray(fn(c)) for c in chunks]))
        metrics = task.metrics(logits, y_all) if task is not None else {
            "accuracy": float((logits.argmax(-1) == y_all).float().mean())}
        rows.append({**facts[w], "accuracy": metrics.get("accuracy"),
                     "macs_ratio": facts[w]["macs"] / full})
    one = [np.ascontiguousarray(x_all[i:i + 1].numpy())
           for i in range(min(latency_samples, len(x_all)))]
    timing = _interleaved(fns, one, rounds)
    for row in rows:
        t = timing[row["width"]]
        row.update(latency_ms_b1=t["median"], latency_ms_b1_spread=t["spread"])
    return {
        "macs": facts[model.width]["macs"],
        "dynamic": {"kind": "slimmable", "width": model.width,
                    "form": "one plain ONNX model per width (model.onnx: the stage's width)",
                    "widths": rows, "latency_samples": len(one), "rounds": rounds,
                    "files": str(workdir)},
    }


__all__ = ["export_width", "measure_widths", "pick_width", "plain_width", "width_latency"]
