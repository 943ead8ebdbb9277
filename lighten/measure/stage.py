"""One metrics.jsonl row: everything measured about one stage of a recipe.

Accuracy is computed by running the *compiled* (deployed) model over the test set, so the
number in the report is the number of what ships.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lighten.measure.energy import energy_estimate
from lighten.measure.macs import count_macs
from lighten.measure.metrics import accuracy, agreement, macro_f1
from lighten.measure.params import count_params
from lighten.measure.robust import robustness as robustness_probe

EVAL_BATCH = 256
ROBUSTNESS_SAMPLES = 1000


def predict_compiled(compiled, dataset, *, progress: bool = False):
    """Run ``compiled`` over ``dataset`` in batches; (logits float32 (N, C), labels int64 (N,))."""
    loader = DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="evaluate", leave=False)
    logits, labels = [], []
    for x, y in loader:
        logits.append(torch.from_numpy(np.asarray(compiled(x.numpy()), dtype=np.float32)))
        labels.append(torch.as_tensor(y).reshape(-1))
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
) -> tuple[dict[str, Any], torch.Tensor]:
    """Measure one stage; returns (row, test logits) — keep the baseline's logits as reference."""
    test = data.test
    if eval_limit is not None and eval_limit < len(test):
        test = Subset(test, range(eval_limit))
    logits, labels = predict_compiled(compiled, test, progress=progress)
    total, nonzero = count_params(model)
    input_shape = tuple(data.input_shape)
    energy = energy_estimate(model, input_shape)
    row: dict[str, Any] = {
        "stage": stage,
        "step": step,
        "accuracy": accuracy(logits, labels),
        "agreement": 1.0 if reference_logits is None else agreement(logits, reference_logits),
        "params": total,
        "nonzero_params": nonzero,
        "bytes": int(artifact_bytes),
        "macs": count_macs(model, input_shape),
        "latency_ms_b1": compiled.latency_ms(1, runs=latency_runs),
        "latency_ms_b64": compiled.latency_ms(64, runs=latency_runs),
        "backend": getattr(compiled, "backend", type(compiled).__name__),
        "seconds": float(seconds),
        "energy_uj": energy.pj_per_inference * 1e-6,
        "energy_sparse_uj": energy.sparse_pj * 1e-6,
        "macro_f1": macro_f1(logits, labels),
        "onnx_bytes": getattr(compiled, "bytes_on_disk", None),
    }
    integer_ops = getattr(compiled, "info", {}).get("integer_ops")
    if integer_ops is not None:
        row["integer_ops"] = list(integer_ops)
    if robustness:
        probe = robustness_probe(compiled, test, samples=min(ROBUSTNESS_SAMPLES, len(test)))
        row.update(probe)
    return row, logits
