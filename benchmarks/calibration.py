"""Activation calibration methods side by side: int8 and 6-bit-activation PTQ on Fashion-MNIST.

    python benchmarks/calibration.py [--models lenet5 resnet20] [--limit N] [--threads 2]
                                     [--calib 512] [--out DIR]

For each shipped checkpoint, every calibration method (minmax, moving_average, percentile, mse,
entropy) quantizes the same float model with the same calibration images (the first ``--calib``
training images, in batches of 64), once with 8-bit weights and activations (w8a8) and once with
6-bit activations (w8a6: weights stay 8-bit, so only the calibrated ranges differ). Each model
is exported and run on ONNX Runtime; accuracy, top-1 agreement and logits SQNR are against the
float model on ONNX Runtime over the test set (``--limit`` images). "quantize s" is the
wall time of ``quantize_ptq_`` (BN folding, the calibration pass, range search, layer swap).
No latency is timed here. Writes calibration.{json,md} to ``--out`` (default
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lighten.backends import get_backend
from lighten.data import DataSpec, load_data
from lighten.measure import accuracy, agreement
from lighten.models import ModelSpec, build_model, shipped_checkpoint
from lighten.provenance import atomic_write_text, describe_machine, machine, versions
from lighten.quant import PTQConfig, quantize_ptq_
from lighten.quant.quantizer import sqnr_db

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)
METHODS = ["minmax", "moving_average", "percentile", "mse", "entropy"]
SETTINGS = {  # name: PTQConfig fields
    "w8a8": {"bits": 8},
    "w8a6": {"bits": 6, "weight_bits": 8},
}


def deployed_logits(model, calib, test_x, work: Path, threads: int) -> torch.Tensor:
    """Test-set logits of ``model`` exported and run on ONNX Runtime (the file is verified)."""
    compiled = get_backend("onnxruntime", threads=threads).compile(
        model, input_shape=SHAPE, workdir=work, sample_inputs=calib[:64])
    return torch.from_numpy(np.concatenate([compiled(b) for b in np.array_split(test_x, 20)]))


def bench_model(name: str, data, args, work: Path) -> list[dict]:
    spec = ModelSpec(zoo=name, weights=str(shipped_checkpoint(name, "fashion-mnist")))
    model = build_model(spec, input_shape=SHAPE, num_classes=10).eval()
    calib = torch.stack([data.train[i][0] for i in range(args.calib)])  # same for every method
    n_test = min(args.limit or len(data.test), len(data.test))
    test_x = torch.stack([data.test[i][0] for i in range(n_test)]).numpy()
    labels = torch.tensor([int(data.test[i][1]) for i in range(n_test)])

    reference = deployed_logits(model, calib, test_x, work / "float", args.threads)
    rows = [{"model": name, "setting": "float", "calibration": "-",
             "accuracy": accuracy(reference, labels), "agreement": 1.0, "sqnr_db": None,
             "quantize_s": None}]
    print(f"  {name}: float accuracy {rows[0]['accuracy']:.4f}", flush=True)
    for setting, fields in SETTINGS.items():
        for method in args.methods:
            start = time.perf_counter()
            q = quantize_ptq_(copy.deepcopy(model), calib.split(64),
                              PTQConfig(calibration=method, **fields))
            seconds = time.perf_counter() - start
            logits = deployed_logits(q, calib, test_x, work / f"{setting}-{method}", args.threads)
            row = {"model": name, "setting": setting, "calibration": method,
                   "accuracy": accuracy(logits, labels),
                   "agreement": agreement(logits, reference),
                   "sqnr_db": sqnr_db(reference, logits), "quantize_s": seconds}
            rows.append(row)
            print(f"  {name} {setting} {method}: accuracy {row['accuracy']:.4f}, agreement "
                  f"{row['agreement']:.4f}, SQNR {row['sqnr_db']:.1f} dB, {seconds:.2f} s",
                  flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | setting | calibration | acc % | Δ pts vs float | agree % | "
             "logits SQNR dB | quantize s |", "|---" * 8 + "|"]
    floats = {r["model"]: r for r in rows if r["setting"] == "float"}
    for r in rows:
        if r["setting"] == "float":
            lines.append(f"| {r['model']} | float | - | {100 * r['accuracy']:.2f} | - | - | - "
                         "| - |")
            continue
        delta = 100 * (r["accuracy"] - floats[r["model"]]["accuracy"])
        lines.append(f"| {r['model']} | {r['setting']} | {r['calibration']} | "
                     f"{100 * r['accuracy']:.2f} | {delta:+.2f} | {100 * r['agreement']:.2f} | "
                     f"{r['sqnr_db']:.1f} | {r['quantize_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--limit", type=int, default=None,
                        help="test images to evaluate (default: all 10,000)")
    parser.add_argument("--calib", type=int, default=512, help="calibration training images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for calibration.{json,md} (a trial run: somewhere in /tmp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_data(DataSpec(name="fashion-mnist"))
    load_before = os.getloadavg()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if shipped_checkpoint(name, "fashion-mnist") is None:
                skipped.append(name)
                print(f"skipping {name}: no shipped Fashion-MNIST checkpoint")
                continue
            rows += bench_model(name, data, args, Path(tmp) / name)
    load_after = os.getloadavg()

    info = machine()
    command = "python benchmarks/calibration.py " + shlex.join(sys.argv[1:] if argv is None
                                                                 else argv)
    n_test = min(args.limit or len(data.test), len(data.test))
    md = table(rows)
    note = (f"\n\nw8a6: 8-bit weights, 6-bit activations. Calibration: the first {args.calib} "
            f"training images for every method; accuracy on the first {n_test} test images, "
            "run by ONNX Runtime; agreement and SQNR against the float model on ONNX Runtime. "
            f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}.")
    if skipped:
        note += f" Not measured (no checkpoint): {', '.join(skipped)}."
    note += (f"\n\nCommand: `{command}`. Machine: {describe_machine(info)}, "
             f"{args.threads} threads; torch {versions().get('torch')}, "
             f"onnxruntime {versions().get('onnxruntime')}.")
    print(md + note)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "machine": info, "versions": versions(),
              "threads": args.threads, "calib_samples": args.calib, "test_images": n_test,
              "load_average": [load_before, load_after], "skipped": skipped, "rows": rows}
    atomic_write_text(args.out / "calibration.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / "calibration.md", md + note + "\n")


if __name__ == "__main__":
    main()
