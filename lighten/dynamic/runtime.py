"""Early-exit deployment: the per-segment form (one ONNX model per segment, run by a small
loop), the alternative to the deployed one-graph form, and the measurement of a dynamic stage.

Segment k is ``features_{k-1} -> (features_k, logits_k)`` (the last: ``-> logits``). At batch
1, :meth:`SegmentRuntime.run_one` runs segment 0, computes the exit's confidence from the
logits in NumPy and returns when it reaches the threshold, so an easy sample never enters the
later segments' sessions (``calls`` counts them). A batch continues only with undecided rows.

**Which form is deployed, and why: one ONNX graph with ``If`` nodes**
(:mod:`lighten.dynamic.onnx_if`, built from these segment files; what ``lighten.export`` and the
runner write as ``model.onnx``). Measured on ResNet-20 / Fashion-MNIST at batch 1, 2 threads,
the same 1000 test images in interleaved rounds (``benchmarks/dynamic.py``, a shared machine):
the If graph took 0.79x the baseline graph's time per sample, the segment loop 1.64x, and the
loop running every segment 2.10x (an earlier, busier run: 0.84x, 1.61x, 1.97x). A loop pays a
Python call, input/output copies and a thread pool hand-off per segment, and several sessions'
thread pools compete for the same cores; the If graph is one session whose branches ORT
optimizes like any graph, pays one scheduling step per exit, and keeps the runner's machinery as
is (one file, verified against PyTorch at batch 1 and 64, reopened and timed in a fresh
process). What the loop does better: a batch drops rows that answered (an ``If`` condition is
one boolean, so a batch runs on while any row is undecided, selecting per row), and the decision
is host code one can change without re-exporting. The loop is kept for that and as the measured
alternative.
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


def export_segments(model, workdir: Path, example: torch.Tensor, *, opset: int = 17
                    ) -> list[Path]:
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
                              opset_version=opset, do_constant_folding=True, dynamo=False)
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

        from lighten.backends.onnxrt import session_options

        workdir = Path(workdir)
        spec = json.loads((workdir / "runtime.json").read_text())
        opts = session_options(threads)
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
                    threads: int | None = None, compiled=None, latency_samples: int = 500,
                    rounds: int = 5) -> dict[str, Any]:
    """metrics.jsonl fields of a multi-exit stage, measured on test samples: ``macs`` = mean
    executed MACs per sample, ``latency_ms_b1`` = mean per-sample batch-1 latency of the
    deployed graph (``compiled``: the runner's ``model.onnx``, the ``If`` form; built here when
    None), median of ``rounds`` interleaved rounds (``_spread``: their IQR), ``latency_ms_b64``
    the same per batch of 64 test samples; under ``dynamic``: per-exit share / accuracy / MACs
    and the segment loop and its every-segment path timed in the same rounds."""
    from torch.utils.data import DataLoader

    from lighten.dynamic.onnx_if import build_if_graph

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="lighten-exits-"))
    workdir = Path(workdir)
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=512):
        xs.append(task.as_inputs(x)[0] if task is not None else x)
        ys.append(torch.as_tensor(y))
    x_all, y_all = torch.cat(xs), torch.cat(ys).numpy()
    files = export_segments(model, workdir, x_all[:1])
    runtime = SegmentRuntime(workdir, threads=threads)
    if compiled is None:
        path = workdir / "if_graph.onnx"
        build_if_graph(files, runtime.thresholds, runtime.criterion,
                       model._classes(x_all.shape[1:]), path)
        compiled = _session_fn(path, threads)
    chunks = [x_all[i:i + 256].numpy() for i in range(0, len(x_all), 256)]
    logits, exits = (np.concatenate(parts) for parts in zip(*(runtime(c) for c in chunks),
                                                            strict=True))
    deployed = np.concatenate([np.asarray(compiled(c)) for c in chunks])
    agree = float((deployed.argmax(-1) == logits.argmax(-1)).mean())
    correct = logits.argmax(-1) == y_all
    costs = np.asarray(model.exit_macs, dtype=np.float64)
    per_exit = []
    for i in range(len(runtime.sessions)):
        mask = exits == i
        per_exit.append({"name": runtime.exit_names[i], "share": float(mask.mean()),
                         "accuracy": float(correct[mask].mean()) if mask.any() else None,
                         "macs": int(costs[i])})
    samples = x_all[:latency_samples].numpy()
    timing = time_batch1(runtime, samples, rounds=rounds,
                         others={"deployed": lambda x: compiled(x)})
    batches = [np.ascontiguousarray(b) for b in np.array_split(
        x_all.numpy(), max(1, len(x_all) // 64)) if len(b)][:8]
    b64 = _time_batches(compiled, batches, rounds=rounds)
    ratio = _stats([d / f for d, f in zip(timing["deployed"]["rounds"], timing["full"]["rounds"],
                                          strict=True)])
    return {
        "macs": int(round(float(costs[exits].mean()))),
        "latency_ms_b1": timing["deployed"]["median"],
        "latency_ms_b1_spread": timing["deployed"]["spread"],
        "latency_ms_b64": b64["median"],
        "latency_ms_b64_spread": b64["spread"],
        "dynamic": {
            "kind": "early_exit", "form": "one ONNX graph with If nodes (model.onnx)",
            "criterion": runtime.criterion, "thresholds": runtime.thresholds,
            "exits": per_exit, "accuracy": float(correct.mean()), "samples": int(len(y_all)),
            "agreement_deployed_vs_loop": agree, "macs_full": int(costs[-1]),
            "macs_ratio_to_full": float(costs[exits].mean() / costs[-1]),
            "latency_ms_b1": timing["deployed"]["median"],
            "latency_ms_b1_spread": timing["deployed"]["spread"],
            "latency_ms_b64": b64["median"], "latency_ms_b64_spread": b64["spread"],
            "latency_ms_b1_segment_loop": timing["dynamic"]["median"],
            "latency_ms_b1_every_segment": timing["full"]["median"],
            "latency_ratio_to_every_segment": ratio["median"],
            "latency_ratio_to_every_segment_spread": ratio["spread"],
            "latency_samples": int(len(samples)), "rounds": rounds,
            "segments": str(workdir),
        },
    }


def _session_fn(path: Path, threads: int | None):
    import onnxruntime as ort

    from lighten.backends.onnxrt import session_options

    opts = session_options(threads)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def time_batch1(runtime: SegmentRuntime, samples: np.ndarray, *, rounds: int = 5,
                others: dict | None = None) -> dict[str, dict]:
    """Mean per-sample batch-1 latency (ms) of the segment loop (``dynamic``), of the same
    segments without exits (``full``) and of ``others`` (name -> ``fn(x)``), timed in
    interleaved rounds over the same samples (order alternating per round): per name the median
    of the rounds' means, their IQR and the per-round means."""
    fns = {"dynamic": lambda x: runtime.run_one(x), "full": runtime.run_full, **(others or {})}
    one = [np.ascontiguousarray(samples[i:i + 1], dtype=np.float32) for i in range(len(samples))]
    return _interleaved(fns, one, rounds)


def _time_batches(fn, batches, *, rounds: int) -> dict:
    return _interleaved({"b": fn}, batches, rounds)["b"]


def _interleaved(fns: dict, items: list, rounds: int) -> dict[str, dict]:
    calls = {name: fn for name, fn in fns.items()}
    for fn in calls.values():  # warm-up: sessions allocate on first use
        for x in items[:5]:
            fn(x)
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = calls[name]
            start = time.perf_counter()
            for x in items:
                fn(x)
            per_round[name].append((time.perf_counter() - start) * 1e3 / max(len(items), 1))
    return {name: _stats(values) for name, values in per_round.items()}


def _stats(values) -> dict:
    low, median, high = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": float(median), "spread": [float(low), float(high)],
            "rounds": [float(v) for v in values]}


def keep_dynamic_latency(row: dict) -> None:
    """After the runner's end-of-run timing (of ``model.onnx`` on random inputs, whose
    confidences say nothing about real samples): a dynamic row keeps the latency its deployed
    graph measured on test samples; the paired ratio to the baseline (random inputs) is
    dropped."""
    dynamic = row.get("dynamic")
    if not isinstance(dynamic, dict) or dynamic.get("latency_ms_b1") is None:
        return
    for batch in (1, 64):
        key = f"latency_ms_b{batch}"
        if dynamic.get(key) is not None:
            row[key] = dynamic[key]
            row[f"{key}_spread"] = dynamic[f"{key}_spread"]
            row.pop(f"{key}_ratio", None)
            row.pop(f"{key}_ratio_spread", None)
