"""Slimmable ResNet-20 on Fashion-MNIST: one artifact at widths 1.0/0.75/0.5/0.25 against a
separately trained model of each width, with ONNX Runtime batch-1 latency per width.

    python benchmarks/slimmable.py [--epochs 10] [--train 60000] [--test 10000] [--runs 7]
        [--widths 1.0 0.75 0.5 0.25] [--lr 0.1] [--latency-samples 500] [--threads N]
        [--inplace-distill] [--quick] [--out DIR]

Both sides start from the same fresh ResNet-20 initialization and get the same ``--epochs``
(SGD, lr ``--lr``, cosine, momentum 0.9, wd 5e-4, flip/shift augmentation, batch 128):

* slimmable: ``lighten.compress(model, {"dynamic.slimmable": {widths, finetune: {epochs, lr}}})``
  trains every width at once (each batch: every width on the labels; ``--inplace-distill``: the
  narrower ones on the widest's outputs);
* separate: for each width, the plain ResNet-20 of that width (the same channels per layer as
  the slimmable model's width, :meth:`SlimmableModel.at_width`) re-initialized and trained alone.

Measured on the test set: accuracy of each width's deployed ONNX model (the slimmable one
exported with ``export_width``: weights physically sliced), MACs, parameters, and batch-1
latency per sample of the slimmable widths' ONNX models timed together in ``--runs``
interleaved rounds on the same test images. Writes ``slimmable.{json,md}`` to ``--out`` (default
benchmarks/results/). Latency measured while other jobs share the CPU is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=10.0, help="training epochs of every model")
    ap.add_argument("--train", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--test", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--runs", type=int, default=7, help="interleaved latency rounds")
    ap.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--latency-samples", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inplace-distill", action="store_true",
                    help="narrower widths learn the widest's outputs (default: the labels)")
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the script runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.test = 0.5, 2000, 500
        args.runs, args.latency_samples = 3, 100

    import lighten
    from lighten.artifact import artifact_bytes, load_artifact, save_artifact
    from lighten.backends import default_threads
    from lighten.data import DataSpec, load_data
    from lighten.dynamic.runtime import _session_fn
    from lighten.dynamic.slimmable import width_facts
    from lighten.dynamic.slimmable_runtime import export_width, width_latency
    from lighten.export import export_onnx
    from lighten.models import ZOO
    from lighten.training import TrainConfig, train

    threads = args.threads or default_threads()
    if args.threads:  # training too, not only ONNX Runtime
        torch.set_num_threads(args.threads)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train,
                              limit_test=args.test))
    x_test = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y_test = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    chunks = [x_test[i:i + 256].numpy() for i in range(0, len(x_test), 256)]
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=128, optimizer="sgd",
                      momentum=0.9, weight_decay=5e-4, schedule="cosine", augment=True,
                      seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-slimmable-"))

    def accuracy(path: Path) -> float:
        fn = _session_fn(path, threads)
        logits = np.concatenate([np.asarray(fn(c)) for c in chunks])
        return float((logits.argmax(-1) == y_test).mean())

    torch.manual_seed(args.seed)
    fresh = ZOO["resnet20"](num_classes=10, input_shape=(1, 28, 28))
    start = time.perf_counter()
    sm, report = lighten.compress(
        fresh, {"dynamic.slimmable": {"widths": args.widths,
                                      "inplace_distill": args.inplace_distill,
                                      "finetune": {"epochs": args.epochs, "lr": args.lr}}},
        data=data, train=cfg, seed=args.seed, progress=True)
    slim_seconds = time.perf_counter() - start
    artifact = work / "slimmable.safetensors"
    save_artifact(sm, artifact, model_spec={"zoo": "resnet20"}, input_shape=[1, 28, 28],
                  num_classes=10, task=data.task)
    reloaded, _ = load_artifact(artifact)
    facts = {f["width"]: f for f in width_facts(sm, x_test[:1])}

    rows = []
    for w in sm.widths:
        path = work / f"slim_{w:g}.onnx"
        export_width(reloaded, w, path, sample_inputs=(x_test[:64],))
        with torch.no_grad():  # the file against the reloaded artifact run at that width
            own = reloaded.eval().set_width(w)(x_test[:256]).numpy()
        diff = float(np.abs(_session_fn(path, threads)(chunks[0]) - own).max())
        rows.append({"width": w, "macs": facts[w]["macs"], "params": facts[w]["params"],
                     "slimmable_accuracy": accuracy(path), "export_max_diff": diff})
    for row in rows:  # the separately trained model of each width: same layers, trained alone
        w = row["width"]
        torch.manual_seed(args.seed)
        alone = _reinitialized(sm.at_width(w))
        start = time.perf_counter()
        train(alone, data.train, cfg, progress=True, task=data.task)
        row["separate_seconds"] = time.perf_counter() - start
        path = work / f"alone_{w:g}.onnx"
        export_onnx(alone.eval(), path, inputs=data.task.inputs, sample_inputs=(x_test[:64],))
        row["separate_accuracy"] = accuracy(path)
        row["gap_points"] = 100 * (row["slimmable_accuracy"] - row["separate_accuracy"])
    timing = width_latency(reloaded, samples=x_test[:args.latency_samples].numpy(),
                           threads=threads, rounds=args.runs, count=args.latency_samples)
    for row in rows:
        t = timing[row["width"]]
        row.update(latency_ms_b1=t["median"], latency_ms_b1_spread=t["spread"],
                   latency_rounds=t["rounds"])
    result = {
        "command": " ".join(["python benchmarks/slimmable.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "epochs": args.epochs, "train": len(data.train), "test": len(data.test),
        "lr": args.lr, "threads": threads, "runs": args.runs,
        "latency_samples": args.latency_samples, "artifact_bytes": artifact_bytes(artifact),
        "slimmable_seconds": slim_seconds, "notes": report.notes, "widths": rows,
        "machine": _machine_line(threads), "load_average": list(os.getloadavg()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "slimmable-quick" if args.quick else "slimmable"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _machine_line(threads: int) -> str:
    from lighten.provenance import machine

    m = machine()
    return f"{m.get('cpu', '')} ({m.get('cpu_class', '')}), threads {threads}"


def _reinitialized(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh weights as ResNet-20's own init gives them (kaiming fan-out convs, default BN and
    Linear), for a model of the same layers."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.Linear)):
            m.reset_parameters()
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
    return model.train()


def _markdown(r: dict) -> str:
    full = r["widths"][0]
    lines = [
        "# Slimmable ResNet-20 on Fashion-MNIST",
        "",
        f"`{r['command'].strip()}` — {r['epochs']:g} epochs on {r['train']} training images "
        f"for every model, accuracy on {r['test']} test images; one artifact "
        f"({r['artifact_bytes'] / 1024:.0f} KiB) holds every width; latency: batch 1, ONNX "
        f"Runtime, {r['threads']} thread(s), median of {r['runs']} interleaved rounds over "
        f"{r['latency_samples']} test images (± half the IQR).",
        "",
        "| width | MACs | params | slimmable acc | separate acc | gap (points) | "
        "latency ms (b1) | vs width 1.0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in r["widths"]:
        low, high = w["latency_ms_b1_spread"]
        lines.append(
            f"| {w['width']:g} | {w['macs'] / 1e6:.2f}M ({w['macs'] / full['macs']:.2f}x) | "
            f"{w['params'] / 1e3:.1f}k | {100 * w['slimmable_accuracy']:.2f}% | "
            f"{100 * w['separate_accuracy']:.2f}% | {w['gap_points']:+.2f} | "
            f"{w['latency_ms_b1']:.3f} ± {(high - low) / 2:.3f} | "
            f"{w['latency_ms_b1'] / full['latency_ms_b1']:.2f}x |")
    lines += ["", f"Slimmable training took {r['slimmable_seconds']:.0f} s (all widths); the "
              f"separate models {sum(w['separate_seconds'] for w in r['widths']):.0f} s together. "
              "Each width's ONNX file against the reloaded artifact run at that width: "
              f"(max |diff| {max(w['export_max_diff'] for w in r['widths']):.1e}).", ""]
    if "wall_seconds" in r:  # measured outside the script (/usr/bin/time)
        lines += [f"Whole run: {r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU.", ""]
    if "machine" in r:
        lines += [f"Machine: {r['machine']}; load average at the end "
                  f"{', '.join(f'{v:.1f}' for v in r['load_average'])} (the CPU was shared: "
                  "latency is indicative, the widths were timed together in interleaved "
                  "rounds).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
