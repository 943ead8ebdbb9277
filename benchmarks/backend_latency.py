"""Float latency of the zoo models on each deployment backend (why stages are measured on ONNX
Runtime, not eager PyTorch). Median of many runs after warm-up, threads pinned.

    python benchmarks/backend_latency.py [--models lenet5 resnet20] [--runs 50]

Writes benchmarks/results/backend_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lighten.backends import default_threads, get_backend
from lighten.models import ZOO
from lighten.provenance import atomic_write_text, machine

RESULTS = Path(__file__).parent / "results"


def measure(model_name: str, backend_name: str, *, runs: int, threads: int) -> dict:
    model = ZOO[model_name](num_classes=10, input_shape=(1, 28, 28)).eval()
    backend = get_backend(backend_name, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = backend.compile(model, input_shape=(1, 28, 28), workdir=Path(tmp))
        return {
            "model": model_name,
            "backend": backend_name,
            "latency_ms_b1": compiled.latency_ms(1, runs=runs * 4),
            "latency_ms_b64": compiled.latency_ms(64, runs=runs),
        }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20", "mobilenetv2"])
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args(argv)

    rows = [measure(m, b, runs=args.runs, threads=args.threads)
            for m in args.models for b in args.backends]
    by_key = {(r["model"], r["backend"]): r for r in rows}
    lines = ["| model | backend | b1 ms | b64 ms | b64 vs torch eager |", "|---|---|---|---|---|"]
    for r in rows:
        eager = by_key.get((r["model"], "torch"))
        speedup = f"{eager['latency_ms_b64'] / r['latency_ms_b64']:.2f}x" if eager else "-"
        lines.append(f"| {r['model']} | {r['backend']} | {r['latency_ms_b1']:.3f} | "
                     f"{r['latency_ms_b64']:.2f} | {speedup} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    info = {"machine": machine(), "threads": args.threads, "rows": rows}
    atomic_write_text(RESULTS / "backend_latency.json", json.dumps(info, indent=2))
    atomic_write_text(RESULTS / "backend_latency.md", table + "\n")


if __name__ == "__main__":
    main()
