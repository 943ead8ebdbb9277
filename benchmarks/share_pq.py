"""Product quantization of ResNet-20 on Fashion-MNIST: artifact bytes against accuracy.

Stages, each saved as an artifact and measured (bytes on disk, test accuracy, MACs, the ONNX
file ONNX Runtime runs): the shipped ResNet-20 checkpoint -> ``prune.channels`` (optional,
``--prune`` = fraction of MACs kept) + fine-tune -> ``share.pq`` (weighted by calibration
activations, 3x3 kernels as 9-weight sub-vectors, ``--bits`` codes, ``--min-share`` sub-vectors
per centroid at least) + codebook fine-tune. The aim (issue #11): >= 20x fewer bytes than the
float artifact at <= 1 point lost. Writes ``share_pq.{json,md}`` to ``--out``.

    python benchmarks/share_pq.py --quick          # minutes: 4000 train images, 1 epoch each
    python benchmarks/share_pq.py --epochs 2       # the full training set (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))


def _model():
    from safetensors.torch import load_file

    from lighten.models import ZOO, shipped_checkpoint

    model = ZOO["resnet20"](input_shape=(1, 28, 28))
    model.load_state_dict(load_file(str(shipped_checkpoint("resnet20", "fashion-mnist"))))
    return model.eval()


def _row(stage: str, model, data, workdir: Path, seconds: float) -> tuple[dict, object]:
    from lighten.artifact import save_artifact
    from lighten.backends import get_backend
    from lighten.measure import count_macs, count_params
    from lighten.training import evaluate

    path = workdir / f"{stage}.safetensors"
    size = save_artifact(model, path, model_spec={"zoo": "resnet20"}, input_shape=[1, 28, 28],
                         num_classes=10, task=data.task)
    x = torch.stack([data.test[i][0] for i in range(64)])
    compiled = get_backend("onnxruntime").compile(model, workdir=workdir / stage,
                                                  inputs=data.task.inputs, sample_inputs=x)
    row = {"stage": stage, "bytes": size, "accuracy": evaluate(model, data.test, task=data.task),
           "params": count_params(model)[0], "macs": count_macs(model, data.task),
           "onnx_bytes": compiled.bytes_on_disk, "seconds": round(seconds, 1)}
    print(json.dumps(row), flush=True)
    return row, compiled


def run(args) -> list[dict]:
    from lighten import compress
    from lighten.data import DataSpec, load_data
    from lighten.prune import ChannelPruneConfig
    from lighten.share.pq import PQConfig
    from lighten.training import TrainConfig

    torch.manual_seed(0)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train,
                              limit_test=args.test))
    train = TrainConfig(epochs=1, lr=0.1, batch_size=128, optimizer="sgd", momentum=0.9,
                        schedule="cosine", augment=True)
    work = Path(tempfile.mkdtemp(prefix="share-pq-"))
    model = _model()
    rows, compiled = [], []
    row, c = _row("baseline", model, data, work, 0.0)
    rows.append(row)
    compiled.append(c)
    if args.prune:
        start = time.perf_counter()
        model, _ = compress(model, ChannelPruneConfig(
            target_macs=args.prune, finetune={"epochs": args.epochs, "lr": args.prune_lr,
                                              "distill": args.distill}),
            data=data, train=train, progress=args.progress)
        row, c = _row("prune.channels", model, data, work, time.perf_counter() - start)
        rows.append(row)
        compiled.append(c)
    start = time.perf_counter()
    pq = PQConfig(codebook_bits=args.bits, min_share=args.min_share, weighted=True,
                  calibration_samples=args.calibration,
                  finetune={"epochs": args.epochs, "lr": args.pq_lr, "distill": args.distill}
                  if args.epochs else None)
    model, report = compress(model, pq, data=data, train=train, progress=args.progress)
    row, c = _row("share.pq", model, data, work, time.perf_counter() - start)
    row["pq_layers"] = report.summary["pq_layers"]
    rows.append(row)
    compiled.append(c)
    if args.runs:
        from bench_timing import time_rows

        time_rows(rows, compiled, runs=args.runs)
    base = rows[0]
    for r in rows:
        r["ratio"] = round(base["bytes"] / r["bytes"], 2)
        r["delta_points"] = round(100 * (r["accuracy"] - base["accuracy"]), 2)
    return rows


def table(rows: list[dict], args) -> str:
    lines = ["# Product quantization: ResNet-20 on Fashion-MNIST", "",
             f"Command: `python benchmarks/share_pq.py {' '.join(args.argv)}` "
             f"({args.train or 60000} training images, {args.test or 10000} test images, "
             f"{args.epochs} fine-tune epochs per step, codes {args.bits} bits, "
             f"min_share {args.min_share}, prune target_macs {args.prune or 'none'}, "
             f"distill {args.distill}).", "",
             "| stage | artifact bytes | smaller | accuracy | points | params | MACs | "
             "ONNX bytes | latency b1 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r.get("latency_ms_b1")
        lines.append(f"| {r['stage']} | {r['bytes']:,} | {r['ratio']}x | "
                     f"{100 * r['accuracy']:.2f}% | {r['delta_points']:+.2f} | "
                     f"{r['params']:,} | {r['macs']:,} | {r['onnx_bytes'] or 0:,} | "
                     f"{'-' if lat is None else f'{lat:.3f}'} |")
    lines += ["", "Bytes: the lighten artifact on disk (codes packed to their bit width, "
              "float16 codebooks, BatchNorm and biases float32). The ONNX file keeps the codes "
              "as int32 Gather indices (ONNX Runtime folds the lookup into a dense weight when "
              "the session starts). Latency measured on a shared machine is indicative only."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=2.0, help="fine-tune epochs per step")
    p.add_argument("--train", type=int, default=None, help="training images (all: 60000)")
    p.add_argument("--test", type=int, default=None, help="test images (all: 10000)")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--min-share", type=int, default=16)
    p.add_argument("--prune", type=float, default=0.75,
                   help="prune.channels target_macs (0: no pruning stage)")
    p.add_argument("--distill", type=float, default=0.5,
                   help="weight of distillation from the baseline in every fine-tune")
    p.add_argument("--prune-lr", type=float, default=0.02)
    p.add_argument("--pq-lr", type=float, default=0.01)
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--runs", type=int, default=20, help="timed runs per model (0: no timing)")
    p.add_argument("--quick", action="store_true", help="4000 train / 2000 test images, "
                   "1 epoch per step, 5 timed runs")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.train, args.test = args.train or 4000, args.test or 2000
        args.epochs, args.runs = min(args.epochs, 1.0), min(args.runs, 5)
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "share_pq.json").write_text(json.dumps(rows, indent=1))
    (args.out / "share_pq.md").write_text(table(rows, args))
    print(table(rows, args))


if __name__ == "__main__":
    main()
