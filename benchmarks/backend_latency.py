"""Float latency of the zoo models on each deployment backend (why stages are measured on ONNX
Runtime, not eager PyTorch). Per model, every backend is timed together in interleaved rounds
(``lighten.measure.timing``: median and interquartile range across rounds), threads pinned.

    python benchmarks/backend_latency.py [--models lenet5 resnet20] [--runs 50] [--out DIR]

Writes backend_latency.{json,md} to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_timing import ms_cell, ratio_cell, spread_note, time_rows

from lighten.backends import default_threads, get_backend
from lighten.models import ZOO
from lighten.provenance import atomic_write_text, describe_machine, machine

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)


def measure(model_name: str, backends: list[str], *, runs: int, threads: int) -> tuple[list, dict]:
    """One zoo model (random init: float latency does not depend on the weights) compiled for
    every backend, then timed together."""
    model = ZOO[model_name](num_classes=10, input_shape=SHAPE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        compiled = [get_backend(b, threads=threads).compile(model, input_shape=SHAPE,
                                                            workdir=Path(tmp) / b)
                    for b in backends]
        rows = [{"model": model_name, "backend": b} for b in backends]
        how = time_rows(rows, compiled, runs=runs)
    return rows, how


def table(rows: list[dict]) -> str:
    by_key = {(r["model"], r["backend"]): r for r in rows}
    lines = ["| model | backend | b1 ms | b64 ms | b64 vs torch eager |", "|---|---|---|---|---|"]
    for r in rows:
        eager = by_key.get((r["model"], "torch"))
        speedup = ratio_cell(eager, r) if eager else "-"
        lines.append(f"| {r['model']} | {r['backend']} | {ms_cell(r, 'latency_ms_b1', 3)} | "
                     f"{ms_cell(r, 'latency_ms_b64')} | {speedup} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20", "mobilenetv2"])
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    parser.add_argument("--runs", type=int, default=50, help="timed runs at batch 64 (x4 at b1)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for backend_latency.{json,md} (a trial run: in /tmp)")
    args = parser.parse_args(argv)

    rows, how = [], {}
    for m in args.models:
        model_rows, how = measure(m, args.backends, runs=args.runs, threads=args.threads)
        rows += model_rows
    md = (table(rows) + f"\n\n{spread_note(how)} {args.threads} threads; "
          f"{describe_machine(machine())}.")
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "threads": args.threads, "timing": how, "rows": rows}
    atomic_write_text(args.out / "backend_latency.json", json.dumps(info, indent=2))
    atomic_write_text(args.out / "backend_latency.md", md + "\n")


if __name__ == "__main__":
    main()
