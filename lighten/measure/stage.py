"""One metrics.jsonl row: everything measured about one stage of a recipe.

Accuracy is computed by running the *compiled* (deployed) model over the test set, so the
number in the report is the number of what ships. What is computed comes from the data's task
(``lighten.task``): accuracy + macro-F1 for classification, perplexity + next-token accuracy for a
language model (``accuracy`` is always there, under the same key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lighten.measure.energy import energy_estimate
from lighten.measure.macs import count_macs
from lighten.measure.params import count_params
from lighten.measure.robust import robustness as robustness_probe
from lighten.measure.timing import time_interleaved

EVAL_BATCH = 256
ROBUSTNESS_SAMPLES = 1000


def predict_compiled(compiled, dataset, *, progress: bool = False, task=None):
    """Run ``compiled`` over ``dataset`` in batches; (outputs float32, targets). Classification:
    logits (N, C) and labels int64 (N,); a language model: (N, T, V) and next ids (N, T)."""
    loader = DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False)
    if progress:
        from lighten.progress import bar

        loader = bar(loader, desc="evaluate")  # a terminal only: no redraws in a log
    logits, labels = [], []
    for x, y in loader:
        inputs = task.as_inputs(x) if task is not None else (x,)
        out = compiled(*(t.numpy() for t in inputs))
        logits.append(torch.from_numpy(np.asarray(out, dtype=np.float32)))
        y = torch.as_tensor(y)
        labels.append(y.reshape(-1) if y.ndim <= 1 else y)
    return torch.cat(logits), torch.cat(labels)


def measure_stage(
    model: nn.Module,
    *,
    stage: str,
    step: str | None,
    data,
    compiled,
    reference_logits,
    artifact_bytes: int,
    seconds: float,
    eval_limit: int | None = None,
    robustness: bool = True,
    latency_runs: int = 50,
    progress: bool = False,
    latency: bool = True,
    workdir=None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Measure one stage; returns (row, reference): keep the baseline's reference for the
    agreement of later stages (``task.reference``: the test logits for classification, the
    next-token predictions for a language model).

    Latency (``latency_ms_b1`` / ``latency_ms_b64``: medians, ``..._spread``: [low, high]) comes
    from :func:`lighten.measure.timing.time_interleaved` with ``latency_runs`` timed runs per
    batch size. ``latency=False`` leaves those keys None: the runner times all stages of a run
    together at the end instead (one stage timed alone competes with another minute's load)."""
    task = data.task
    test = data.test
    if eval_limit is not None and eval_limit < len(test):
        test = Subset(test, range(eval_limit))
    logits, labels = predict_compiled(compiled, test, progress=progress, task=task)
    metrics = task.metrics(logits, labels)
    total, nonzero = count_params(model)
    energy = energy_estimate(model, task)
    row: dict[str, Any] = {
        "stage": stage,
        "step": step,
        "accuracy": metrics.get("accuracy"),
        "agreement": (1.0 if reference_logits is None
                      else task.agreement(logits, reference_logits)),
        "params": total,
        "nonzero_params": nonzero,
        "bytes": int(artifact_bytes),
        "macs": count_macs(model, task),
        "latency_ms_b1": None,  # filled below, or by the runner's end-of-run timing
        "latency_ms_b64": None,
        "backend": getattr(compiled, "backend", type(compiled).__name__),
        "seconds": float(seconds),
        "energy_uj": energy.pj_per_inference * 1e-6,
        "energy_sparse_uj": energy.sparse_pj * 1e-6,
        **{k: v for k, v in metrics.items() if k != "accuracy"},  # macro_f1, perplexity, ...
        "onnx_bytes": getattr(compiled, "bytes_on_disk", None),
    }
    if task.primary not in ("accuracy", "perplexity"):  # a user task's own headline metric
        row["primary_metric"] = task.primary
    if latency:
        row.update(time_interleaved([compiled], runs=latency_runs).row_fields(0))
    integer_ops = getattr(compiled, "info", {}).get("integer_ops")
    if integer_ops is not None:
        row["integer_ops"] = list(integer_ops)
    # the export self-check: export_max_diff_b1 / _b64, export_agreement_b1 / _b64, inputs
    row.update(getattr(compiled, "info", {}).get("export_check") or {})
    dynamic = getattr(model, "dynamic_measure", None)
    if callable(dynamic):  # executed MACs, batch-1 latency and exits of the deployed form
        row.update(dynamic(test, task=task, threads=getattr(compiled, "info", {}).get("threads"),
                           compiled=compiled,
                           workdir=None if workdir is None else Path(workdir) / "segments"))
    if robustness and task.perturbable:  # noise / shift perturb images, not token ids
        probe = robustness_probe(compiled, test, samples=min(ROBUSTNESS_SAMPLES, len(test)))
        row.update(probe)
    return row, task.reference(logits)
