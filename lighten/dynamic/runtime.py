"""The deployed form of an early-exit model: one ONNX model per segment, run by a small loop.

Segment k is ``features_{k-1} -> (features_k, logits_k)`` (the last: ``-> logits``). At batch
1, :meth:`SegmentRuntime.run_one` runs segment 0, computes the exit's confidence from its 10
logits in NumPy and returns when it reaches the threshold, so an easy sample never enters the
later segments' ONNX Runtime sessions. A batch continues only with its undecided rows.

Why per-segment models and not one ONNX graph with ``If`` nodes. Both stop early at batch 1,
but: (1) every segment here is a plain graph ORT optimizes whole (conv+BN+ReLU fusion, NCHWc
layouts), where ``If`` branches are subgraphs optimized and executed separately, with per-If
scheduling overhead and layout conversions at each branch boundary; (2) an ``If`` condition is
one boolean for the whole batch, so a batch either stops together or recomputes exits for rows
that had answered, while the loop drops finished rows from the batch; (3) the loop's cost is
known and small: one ``session.run`` (~10-30 us from Python) per executed segment, and the exit
test is a softmax over the class logits; (4) each segment file opens in any runtime that opens
ONNX (OpenVINO too) and is checked on its own. Against it: several files instead of one, and
the decision runs in the host language. ``benchmarks/dynamic.py`` times the loop against the
single baseline graph at batch 1.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lighten.errors import BackendError

SEGMENT_FILE = "segment{k}.onnx"


class _Segment(nn.Module):
    """Modules of one segment plus its exit head: ``h -> (h', logits)`` (the last: ``logits``)."""

    def __init__(self, modules: list[nn.Module], head: nn.Module | None):
        super().__init__()
        self.body = nn.Sequential(*modules)
        self.head = head

    def forward(self, h):
        h = self.body(h)
        return (h, self.head(h)) if self.head is not None else h


def export_segments(model, workdir: Path, example: torch.Tensor) -> list[Path]:
    """Write ``segment{k}.onnx`` for every segment of ``model`` (a MultiExitModel) and
    ``runtime.json`` (thresholds, criterion, exit names, MACs); returns the segment files."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    paths = []
    h = example[:1]
    segments = model.segments()
    for k, modules in enumerate(segments):
        head = model.heads[k] if k < len(segments) - 1 else None
        segment = _Segment(modules, head).eval()
        path = workdir / SEGMENT_FILE.format(k=k)
        outputs = ["features", "logits"] if head is not None else ["logits"]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(segment, (h,), str(path), input_names=["input"],
                              output_names=outputs,
                              dynamic_axes={n: {0: "batch"} for n in ["input", *outputs]},
                              opset_version=17, do_constant_folding=True, dynamo=False)
            out = segment(h)
        h = out[0] if head is not None else out
        paths.append(path)
    (workdir / "runtime.json").write_text(json.dumps({
        "segments": [p.name for p in paths], "thresholds": model.thresholds.tolist(),
        "criterion": model.criterion, "exits": model.exit_names,
        "exit_macs": model.exit_macs}, indent=1))
    return paths


def _confidence(logits: np.ndarray, criterion: str) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    if criterion == "max_softmax":
        return p.max(axis=-1)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)
    return 1.0 - entropy / np.log(logits.shape[-1])


class SegmentRuntime:
    """Runs the segment files of :func:`export_segments` with early exit. ``calls[k]`` counts
    the samples that entered segment k (what an exited sample did not run)."""

    def __init__(self, workdir: Path, *, threads: int | None = None):
        import onnxruntime as ort

        from lighten.backends import default_threads

        workdir = Path(workdir)
        spec = json.loads((workdir / "runtime.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.sessions = [ort.InferenceSession(str(workdir / name), opts,
                                                  providers=["CPUExecutionProvider"])
                             for name in spec["segments"]]
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load the segments in {workdir}: "
                               f"{str(exc).splitlines()[0]}") from exc
        self.thresholds = [float(t) for t in spec["thresholds"]]
        self.criterion = spec["criterion"]
        self.exit_names = spec["exits"]
        self.exit_macs = spec.get("exit_macs")
        self.calls = [0] * len(self.sessions)

    def run_one(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """One sample (batch 1): (logits, exit index); stops at the first confident exit."""
        h = x
        last = len(self.sessions) - 1
        for k, session in enumerate(self.sessions):
            self.calls[k] += 1
            if k == last:
                return session.run(None, {"input": h})[0], k
            h, logits = session.run(None, {"input": h})
            if _confidence(logits, self.criterion)[0] >= self.thresholds[k]:
                return logits, k
        raise AssertionError("unreachable")

    def run_full(self, x: np.ndarray) -> np.ndarray:
        """Every segment, no exits: the static path through the same sessions."""
        h = x
        for k, session in enumerate(self.sessions):
            outs = session.run(None, {"input": h})
            h = outs[0]
            if k == len(self.sessions) - 1:
                return h
        raise AssertionError("unreachable")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch: (logits, exit per row); only undecided rows enter the next segment."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        exits = np.full(n, len(self.sessions) - 1)
        result: np.ndarray | None = None
        rows = np.arange(n)
        h = x
        for k, session in enumerate(self.sessions):
            self.calls[k] += len(rows)
            outs = session.run(None, {"input": h})
            logits = outs[-1]
            if result is None:
                result = np.zeros((n, logits.shape[-1]), dtype=np.float32)
            if k == len(self.sessions) - 1:
                result[rows] = logits
                break
            done = _confidence(logits, self.criterion) >= self.thresholds[k]
            result[rows[done]] = logits[done]
            exits[rows[done]] = k
            rows, h = rows[~done], np.ascontiguousarray(outs[0][~done])
            if not len(rows):
                break
        return result, exits


def measure_dynamic(model, dataset, *, task=None, workdir: Path | None = None,
                    threads: int | None = None, latency_samples: int = 500,
                    rounds: int = 5) -> dict[str, Any]:
    """metrics.jsonl fields of a multi-exit stage, measured on its deployed form: ``macs`` =
    mean executed MACs per test sample, ``latency_ms_b1`` = mean per-sample batch-1 latency
    of the segment runtime (median of ``rounds`` interleaved rounds, ``_spread`` their IQR),
    and under ``dynamic`` the per-exit share/accuracy/MACs and the same runtime's full path."""
    from torch.utils.data import DataLoader

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="lighten-exits-"))
    workdir = Path(workdir)
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=512):
        xs.append(task.as_inputs(x)[0] if task is not None else x)
        ys.append(torch.as_tensor(y))
    x_all, y_all = torch.cat(xs), torch.cat(ys).numpy()
    export_segments(model, workdir, x_all[:1])
    runtime = SegmentRuntime(workdir, threads=threads)
    logits, exits = runtime(x_all.numpy())
    # the deployed runtime must answer what the model answers
    with torch.no_grad():
        ref = model.eval()(x_all[:64]).numpy()
    agree = float((ref.argmax(-1) == logits[:64].argmax(-1)).mean())
    correct = logits.argmax(-1) == y_all
    costs = np.asarray(model.exit_macs, dtype=np.float64)
    k = len(runtime.sessions)
    per_exit = []
    for i in range(k):
        mask = exits == i
        per_exit.append({"name": runtime.exit_names[i], "share": float(mask.mean()),
                         "accuracy": float(correct[mask].mean()) if mask.any() else None,
                         "macs": int(costs[i])})
    timing = time_batch1(runtime, x_all[:latency_samples].numpy(), rounds=rounds)
    return {
        "macs": int(round(float(costs[exits].mean()))),
        "latency_ms_b1": timing["dynamic"]["median"],
        "latency_ms_b1_spread": timing["dynamic"]["spread"],
        "dynamic": {
            "kind": "early_exit", "form": "per-segment ONNX Runtime sessions",
            "workdir": str(workdir), "criterion": runtime.criterion,
            "thresholds": runtime.thresholds, "exits": per_exit,
            "accuracy": float(correct.mean()), "samples": int(len(y_all)),
            "agreement_with_model": agree, "macs_full": int(costs[-1]),
            "macs_ratio_to_full": float(costs[exits].mean() / costs[-1]),
            "latency_ms_b1": timing["dynamic"]["median"],
            "latency_ms_b1_spread": timing["dynamic"]["spread"],
            "latency_ms_b1_full": timing["full"]["median"],
            "latency_ratio_to_full": timing["ratio"]["median"],
            "latency_ratio_to_full_spread": timing["ratio"]["spread"],
            "latency_samples": int(min(latency_samples, len(y_all))), "rounds": rounds,
        },
    }


def time_batch1(runtime: SegmentRuntime, samples: np.ndarray, *, rounds: int = 5,
                others: dict | None = None) -> dict[str, dict]:
    """Mean per-sample batch-1 latency (ms) of the early-exit loop and of the full path (every
    segment), and of ``others`` (name -> ``fn(x)``), timed in interleaved rounds over the same
    samples (order alternating per round); per name the median of the rounds' means and their
    IQR, and ``ratio``: the dynamic time over the full path's, per round."""
    fns = {"dynamic": lambda x: runtime.run_one(x), "full": runtime.run_full, **(others or {})}
    one = [np.ascontiguousarray(samples[i:i + 1], dtype=np.float32) for i in range(len(samples))]
    for fn in fns.values():  # warm-up: sessions allocate on first use
        for x in one[:5]:
            fn(x)
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for x in one:
                fn(x)
            per_round[name].append((time.perf_counter() - start) * 1e3 / max(len(one), 1))
    out = {name: _stats(values) for name, values in per_round.items()}
    out["ratio"] = _stats([d / f for d, f in zip(per_round["dynamic"], per_round["full"],
                                                 strict=True)])
    return out


def _stats(values) -> dict:
    low, median, high = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": float(median), "spread": [float(low), float(high)],
            "rounds": [float(v) for v in values]}


def keep_dynamic_latency(row: dict) -> None:
    """After the runner's end-of-run timing (of ``model.onnx``, the batch form that computes
    every exit, on random inputs): a dynamic row keeps the batch-1 latency of its deployed
    runtime on test samples; the paired ratio to the baseline was of the other graph."""
    dynamic = row.get("dynamic")
    if not isinstance(dynamic, dict) or dynamic.get("latency_ms_b1") is None:
        return
    row["latency_ms_b1"] = dynamic["latency_ms_b1"]
    row["latency_ms_b1_spread"] = dynamic["latency_ms_b1_spread"]
    row.pop("latency_ms_b1_ratio", None)
    row.pop("latency_ms_b1_ratio_spread", None)
