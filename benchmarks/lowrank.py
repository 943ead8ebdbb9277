"""Tucker-2 (and CP) of ResNet-20's 3x3 convs on Fashion-MNIST: MACs, accuracy before and after
fine-tuning, artifact bytes, and latency on ONNX Runtime and OpenVINO.

    python benchmarks/lowrank.py [--target 0.5] [--epochs 2] [--train N] [--test N] [--runs 60]
        [--threads 2] [--cp] [--no-layer-latency] [--quick] [--out DIR]

The baseline is the shipped ResNet-20 Fashion-MNIST checkpoint (``lighten/models/weights``).
``lowrank.tucker {target_macs}`` runs through ``lighten.compress`` exactly as the recipe step
does (``recipes/tucker_resnet20.yaml``), once with its per-layer latency check on ONNX Runtime
(as the recipe runs it) and once with every layer factorized (``measure_latency: false``: what
the MAC target alone gives); each factorized model is then fine-tuned with the library's
training loop at the step's default fine-tune learning rate (0.1 x the checkpoint's SGD lr
0.1, cosine, augmentation as the checkpoint was trained). Fine-tuning the same factorized model
(rather than compressing again with ``finetune:``) keeps the per-layer latency decisions, which
are timings and so not repeatable, identical between the two rows.

Accuracy is that of the deployed ONNX Runtime model on the test images; bytes are the lighten
artifact (safetensors); all deployments (every row on ORT and on OpenVINO) are timed together
in interleaved rounds in a fresh process (``bench_timing.time_rows``). Writes
``lowrank.{json,md}`` to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import ms_cell, ratio_cell, spread_note, time_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)
SPEC = {"zoo": "resnet20", "input_shape": list(SHAPE)}


def baseline():
    from lighten.models import ModelSpec, build_model, load_weights, shipped_checkpoint

    model = build_model(ModelSpec(zoo="resnet20"), input_shape=SHAPE, num_classes=10)
    load_weights(model, shipped_checkpoint("resnet20", "fashion-mnist"))
    return model.eval()


def finetune(model, data, epochs: float):
    """The step's fine-tune: 0.1 x the checkpoint's training lr, the rest as it was trained."""
    from lighten.training import TrainConfig, train

    cfg = TrainConfig(epochs=epochs, lr=0.01, batch_size=128, optimizer="sgd", momentum=0.9,
                      weight_decay=5e-4, schedule="cosine", augment=True)
    train(model, data.train, cfg, progress=False, task=data.task)
    return model.eval()


def describe(name: str, model, report, seconds: float, work: Path) -> dict:
    from lighten.artifact import save_artifact
    from lighten.measure import count_macs

    path = work / f"{name}.safetensors"
    size = save_artifact(model, path, model_spec=SPEC, input_shape=list(SHAPE), num_classes=10)
    row = {"model": name, "macs": count_macs(model, SHAPE), "bytes": size,
           "params": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1)}
    if report is not None:
        layers = [r for r in report.layers if "decision" in r]
        row.update(kept=sum(r["decision"] == "kept" for r in layers), candidates=len(layers),
                   layers=layers, notes=report.notes)
    return row


def run(args) -> list[dict]:
    from lighten import compress
    from lighten.backends import get_backend
    from lighten.data import DataSpec, load_data
    from lighten.lowrank import CPConfig, TuckerConfig
    from lighten.target import Target

    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train, limit_test=args.test))
    target = Target.this_machine(threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="lighten-lowrank-bench-"))
    models, rows = {}, []
    base = baseline()
    models["baseline"] = base
    rows.append(describe("baseline", base, None, 0.0, work))

    # as the recipe runs it (each layer kept only where its factorized form times faster on
    # ORT), and every layer factorized (MACs alone): the two can differ a lot on a CPU
    variants = [("latency check", True), ("all layers", False)]
    for label, check in variants if args.layer_latency else variants[1:]:
        t0 = time.time()
        tucker, report = compress(base, TuckerConfig(target_macs=args.target,
                                                     measure_latency=check),
                                  data=data, target=target)
        name = f"tucker-2 target_macs {args.target:g}, {label}"
        models[name] = tucker
        rows.append(describe(name, tucker, report, time.time() - t0, work))
        t0 = time.time()
        tuned = finetune(copy.deepcopy(tucker), data, args.epochs)
        name += f" + fine-tune {args.epochs:g} ep"
        models[name] = tuned
        rows.append(describe(name, tuned, None, time.time() - t0, work))  # the same layers
    if args.cp:
        t0 = time.time()
        cp, report = compress(base, CPConfig(max_error=args.cp_error, measure_latency=False),
                              data=data, target=target)
        cp = finetune(cp, data, args.epochs)
        name = f"cp max_error {args.cp_error:g}, all layers + fine-tune {args.epochs:g} ep"
        models[name] = cp
        rows.append(describe(name, cp, report, time.time() - t0, work))

    test_x, test_y = data.test.tensors
    sample = test_x[:64]
    timed, compiled = [], []
    for row in rows:
        for backend in ("onnxruntime", "openvino"):
            be = get_backend(backend, threads=args.threads)
            c = be.compile(models[row["model"]], input_shape=SHAPE, sample_inputs=sample,
                           workdir=work / row["model"].replace(" ", "_") / backend)
            if backend == "onnxruntime":
                logits = np.concatenate([c(test_x[i:i + 500].numpy())
                                         for i in range(0, len(test_x), 500)])
                row["accuracy"] = float(np.mean(logits.argmax(1) == test_y.numpy()))
            timed.append({"model": row["model"], "backend": backend})
            compiled.append(c)
    how = time_rows(timed, compiled, runs=args.runs)
    for row in rows:
        row["latency"] = {t["backend"]: {k: v for k, v in t.items()
                                         if k.startswith("latency_ms")}
                          for t in timed if t["model"] == row["model"]}
    rows[0]["how"] = how
    return rows


def markdown(rows: list[dict], args) -> str:
    base = rows[0]
    command = (f"python benchmarks/lowrank.py --target {args.target:g} --epochs {args.epochs:g}"
               + (f" --train {args.train}" if args.train else "")
               + (f" --test {args.test}" if args.test else "") + f" --runs {args.runs}"
               + (" --cp" if args.cp else "") + ("" if args.layer_latency
                                                else " --no-layer-latency"))
    lines = ["# Low-rank factorization: ResNet-20 on Fashion-MNIST", "", f"`{command}`", "",
             "| model | MACs | fewer MACs | params | artifact KB | accuracy % | Δ points | "
             "ORT b1 ms | ORT b64 ms | ORT b64 vs base | OpenVINO b1 ms | OpenVINO b64 ms | "
             "OpenVINO b64 vs base |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ort, ov = row["latency"]["onnxruntime"], row["latency"]["openvino"]
        b_ort, b_ov = base["latency"]["onnxruntime"], base["latency"]["openvino"]
        lines.append(
            f"| {row['model']} | {row['macs'] / 1e6:.2f} M | {base['macs'] / row['macs']:.2f}x | "
            f"{row['params']:,} | {row['bytes'] / 1024:.0f} | {100 * row['accuracy']:.2f} | "
            f"{100 * (row['accuracy'] - base['accuracy']):+.2f} | "
            f"{ms_cell(ort, 'latency_ms_b1')} | {ms_cell(ort, 'latency_ms_b64')} | "
            f"{ratio_cell(ort, b_ort)} | {ms_cell(ov, 'latency_ms_b1')} | "
            f"{ms_cell(ov, 'latency_ms_b64')} | {ratio_cell(ov, b_ov)} |")
    lines += ["", spread_note(base["how"]), ""]
    for row in rows[1:]:
        if "layers" not in row:
            continue
        lines += [f"Per-layer decisions, {row['model']} ({row['kept']} of {row['candidates']} "
                  "convs replaced):", "",
                  "| layer | rank (out, in) | kernel error | MACs before → after | "
                  "ms before → after (ORT, per layer) | decision |", "|---|---|---|---|---|---|"]
        for r in row["layers"]:
            ms = (f"{r['ms_before']:.3g} → {r['ms_after']:.3g}" if "ms_before" in r else "-")
            rank = r["rank"] if isinstance(r["rank"], int) else tuple(r["rank"])
            lines.append(f"| {r['module']} | {rank} | {r['error']:.3f} | "
                         f"{r['macs_before']:,} → {r['macs_after']:,} | {ms} | {r['decision']} |")
        lines += [""] + [f"- {note}" for note in row.get("notes", [])] + [""]
    lines += [f"Test images: {args.test or 10000}; fine-tune on "
              f"{args.train or 60000} training images. Machine: {os.cpu_count()} CPUs, "
              f"{args.threads} threads; load average at the end {os.getloadavg()[0]:.1f} "
              "(latency on a shared machine is noise: rerun on a quiet one)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.5, help="target_macs of lowrank.tucker")
    p.add_argument("--epochs", type=float, default=2.0, help="fine-tune epochs")
    p.add_argument("--train", type=int, default=None, help="training images (default all)")
    p.add_argument("--test", type=int, default=None, help="test images (default all)")
    p.add_argument("--runs", type=int, default=60, help="timed runs per model and batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cp", action="store_true", help="add a lowrank.cp row")
    p.add_argument("--cp-error", type=float, default=0.3)
    p.add_argument("--no-layer-latency", dest="layer_latency", action="store_false",
                   help="only the all-layers rows (no per-layer ORT timing)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.05 epochs, 2000 train / 1000 test images, 10 runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.test, args.runs = 0.05, 2000, 1000, 10
    torch.manual_seed(0)
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "lowrank-quick" if args.quick else "lowrank"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1, default=str))
    (args.out / f"{name}.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
