"""Time the deployed stages of a run in a fresh process: what a user's deployment sees.

By the time the runner times latency its process has trained and fine-tuned (PyTorch's thread
pools, the allocator's history) and opened every stage's runtime session once already. Timed in
that process, LeNet-5's magnitude-pruned stage came out 1.5-1.9x *faster* than its baseline
although both run the same dense graph; timed in a fresh process they were equal. So the runner
hands the deployment files (ONNX Runtime, OpenVINO) to a child process that opens nothing else:

    python -m lighten.measure.timing_worker REQUEST.json RESULT.json

REQUEST names the backend, threads, the stages' ``deploy/<stage>/`` folders, the model's inputs,
the runs and the seed; RESULT is :meth:`Timing.to_dict` (every round's numbers), read back with
:meth:`Timing.from_dict`. The benchmarks use the other form, :func:`time_files_in_fresh_process`:
a list of already compiled models (each names its own backend, file and threads through
``compiled.deployment()``), so peers' files (NNCF, ORT's quantizer) are timed the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from lighten.measure.timing import Timing, time_interleaved

# backends whose compile leaves a file a fresh process can open (torch rebuilds from artifacts)
FILE_BACKENDS = ("onnxruntime", "openvino")


def time_in_fresh_process(backend: str, threads: int | None, workdirs: Sequence[Path],
                          inputs: Sequence, *, runs: int, seed: int,
                          timeout: float = 3600) -> Timing | None:
    """Time the deployments in ``workdirs`` together in a child process; None where that is not
    possible (a backend without deployment files, a missing file, the child failing), so the
    caller times in its own process instead."""
    if backend not in FILE_BACKENDS or not all((Path(w) / "model.onnx").is_file()
                                               for w in workdirs):
        return None
    names = [str(w) for w in workdirs]
    request = {"backend": backend, "threads": threads, "workdirs": names, "runs": runs,
               "seed": seed, "inputs": [_input_to_json(s) for s in inputs]}
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        done = subprocess.run([sys.executable, "-m", "lighten.measure.timing_worker", str(req),
                               str(res)], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not res.is_file():
            return None
        return Timing.from_dict(json.loads(res.read_text()), names)


def time_files_in_fresh_process(compiled: Sequence, *, runs: int, seed: int,
                                batches: Sequence[int] = (1, 64),
                                timeout: float = 3600) -> Timing | None:
    """Time models already compiled in this process again in a child that opens only their
    files, in interleaved rounds; None when one of them has no file to open (``deployment()``
    missing or None, e.g. eager PyTorch) or the child fails, so the caller times in-process."""
    entries = []
    for c in compiled:
        deployment = c.deployment() if callable(getattr(c, "deployment", None)) else None
        if deployment is None:
            return None
        entries.append({**deployment, "inputs": [_input_to_json(s) for s in c.inputs]})
    names = [str(i) for i in range(len(entries))]
    request = {"models": entries, "runs": runs, "seed": seed, "batches": list(batches)}
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        done = subprocess.run([sys.executable, "-m", "lighten.measure.timing_worker", str(req),
                               str(res)], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not res.is_file():
            return None
        return Timing.from_dict(json.loads(res.read_text()), names)


def _input_to_json(spec) -> dict:
    return {"name": spec.name, "shape": list(spec.shape),
            "dtype": str(spec.dtype).removeprefix("torch."), "high": spec.high}


def _input_from_json(entry: dict):
    from lighten.task import InputSpec

    return InputSpec(entry["name"], tuple(entry["shape"]), getattr(torch, entry["dtype"]),
                     entry.get("high"))


def main(argv: Sequence[str] | None = None) -> int:
    from lighten.backends import get_backend

    request_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    request = json.loads(Path(request_path).read_text())
    if "models" in request:  # time_files_in_fresh_process: each model names its own backend
        compiled = [get_backend(m["backend"], threads=m["threads"]).compile_file(
            m["path"], inputs=[_input_from_json(e) for e in m["inputs"]])
            for m in request["models"]]
        names = [str(i) for i in range(len(compiled))]
    else:
        backend = get_backend(request["backend"], threads=request["threads"])
        inputs = [_input_from_json(e) for e in request["inputs"]]
        compiled = [backend.load(Path(w), inputs=inputs) for w in request["workdirs"]]
        names = request["workdirs"]
    if any(c is None for c in compiled):
        return 2
    timing = time_interleaved(compiled, runs=request["runs"], seed=request["seed"],
                              batches=tuple(request.get("batches", (1, 64))))
    Path(result_path).write_text(json.dumps(timing.to_dict(names)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
