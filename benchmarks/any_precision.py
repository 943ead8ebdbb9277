"""Any-precision ResNet-20 / Fashion-MNIST: 8/4/2-bit weights from one artifact vs a model
quantized separately at each width.

    python benchmarks/any_precision.py [--train 60000] [--epochs 3] [--bits 8 4 2]
        [--compare weight_only single qat qat_ste] [--distill 0] [--lr-scale 0.1] [--test 10000]
        [--quick] [--out DIR]

Starts from the shipped ResNet-20 Fashion-MNIST weights (lighten/models/weights), applies
``dynamic.any_precision {bits, finetune: {epochs}}`` on ``--train`` training images, saves ONE
artifact, and for each width loads it with ``load_artifact(path, bits=b)`` and measures test
accuracy of that precision's exported ONNX model on ONNX Runtime. Each width is compared with a
model quantized for that width alone, with the same fine-tune epochs:

* ``weight_only``: ``quant.weight_only {bits: b, group_size: -1, method: gptq}`` (per-channel
  weights, float activations: the same setting), fine-tuned (biases/BN: its codes are fixed);
* ``single``: ``dynamic.any_precision {bits: [b]}``: the same nested QAT trained for one width;
* ``qat``: ``quant.qat {weight_bits: b, activation_bits: 8}`` (LSQ; activations are int8 too,
  a harder setting);
* ``qat_ste``: the same with ``lsq: false`` (calibrated scales kept, straight-through rounding):
  LSQ's raw step sizes under this SGD fine-tune can be pushed past zero at 8 bits (the quick
  run's 8-bit LSQ model fell to ~35%), so this is the QAT baseline that is not hurt by that.

Writes ``any_precision.{json,md}`` to ``--out`` (default benchmarks/results/).
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
    ap.add_argument("--train", type=int, default=60000, help="training images used")
    ap.add_argument("--epochs", type=float, default=3.0, help="fine-tune epochs (every model)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--compare", nargs="*", default=["weight_only", "single"],
                    choices=["weight_only", "single", "qat", "qat_ste"])
    ap.add_argument("--distill", type=float, default=0.0,
                    help="in-place distillation weight of narrower widths from the widest")
    ap.add_argument("--lr-scale", type=float, default=0.1, help="fine-tune lr / train lr")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the script runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.epochs, args.test = 1000, 0.3, 500

    import lighten
    from lighten.artifact import artifact_bytes, load_artifact, save_artifact
    from lighten.data import DataSpec, load_data
    from lighten.models import ZOO, load_weights, shipped_checkpoint
    from lighten.training import TrainConfig

    if args.threads:  # training too, not only ONNX Runtime
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train,
                              limit_test=args.test))
    spec = {"zoo": "resnet20"}

    def base():
        model = ZOO["resnet20"](num_classes=10, input_shape=(1, 28, 28))
        return load_weights(model, shipped_checkpoint("resnet20", "fashion-mnist")).eval()

    # the shipped checkpoint's training (recipes/any_precision_resnet20.yaml's train block);
    # fine-tunes run at lr_scale x its lr
    train = TrainConfig(epochs=1, lr=0.1, batch_size=args.batch_size, optimizer="sgd",
                        momentum=0.9, weight_decay=5e-4, schedule="cosine")
    finetune = {"epochs": args.epochs, "lr_scale": args.lr_scale}
    x_test = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y_test = torch.as_tensor([int(data.test[i][1]) for i in range(len(data.test))])

    def accuracy(model) -> float:
        from lighten.export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            check = export_onnx(model, Path(tmp) / "m.onnx", input_shape=(1, 28, 28),
                                verify=False)
            run = _session(check.path, args.threads)
            logits = np.concatenate([run(x_test[i:i + 500].numpy())
                                     for i in range(0, len(x_test), 500)])
        return float((logits.argmax(1) == y_test.numpy()).mean())

    rows = {"float": accuracy(base())}
    print(f"float: {rows['float']:.4f}", flush=True)
    out: dict = {"config": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()}, "float_accuracy": rows["float"]}
    start = time.perf_counter()
    anyp, report = lighten.compress(base(), {"dynamic.any_precision": {
        "bits": args.bits, "distill": args.distill, "finetune": finetune}}, data=data,
        train=train)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any_precision.safetensors"
        save_artifact(anyp, path, model_spec=spec, input_shape=(1, 28, 28), num_classes=10,
                      task=data.task)
        size = artifact_bytes(path)
        per_bits = {}
        for b in args.bits:
            loaded, _ = load_artifact(path, bits=b)  # one file, precision chosen at load
            per_bits[b] = {"accuracy": accuracy(loaded), "weight_sqnr_db":
                           report.summary["dynamic"]["weight_sqnr_db"][str(b)]}
            print(f"any-precision w{b}: {per_bits[b]['accuracy']:.4f}", flush=True)
    out["any_precision"] = {"artifact_bytes": size, "seconds": seconds, "bits": per_bits}
    separate: dict = {name: {} for name in args.compare}
    for b in args.bits:
        for name in args.compare:
            config = {
                "weight_only": {"quant.weight_only": {"bits": b, "group_size": -1,
                                                      "method": "gptq", "finetune": finetune}},
                "single": {"dynamic.any_precision": {"bits": [b], "finetune": finetune}},
                "qat": {"quant.qat": {"weight_bits": b, "activation_bits": 8,
                                      "finetune": finetune}},
                "qat_ste": {"quant.qat": {"weight_bits": b, "activation_bits": 8, "lsq": False,
                                          "finetune": finetune}},
            }[name]
            start = time.perf_counter()
            model, _ = lighten.compress(base(), config, data=data, train=train)
            try:
                separate[name][b] = {"accuracy": accuracy(model)}
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a result too
                separate[name][b] = {"accuracy": None, "error": f"{type(e).__name__}: {e}"[:300]}
            separate[name][b]["seconds"] = time.perf_counter() - start
            print(f"{name} w{b}: {separate[name][b]}", flush=True)
            print("partial: " + json.dumps({"any_precision": out["any_precision"],
                                            "separate": separate}), flush=True)
    out["separate"] = separate
    out["command"] = " ".join(["python benchmarks/any_precision.py",
                               *(sys.argv[1:] if argv is None else argv)])
    out["machine"] = _machine_line(args.threads)
    out["load_average"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "any_precision.quick" if args.quick else "any_precision"
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2))
    (args.out / f"{stem}.md").write_text(_markdown(out, args))
    print((args.out / f"{stem}.md").read_text())
    return 0


def _machine_line(threads: int | None) -> str:
    from lighten.provenance import machine

    m = machine()
    return f"{m.get('cpu', '')} ({m.get('cpu_class', '')}), threads {threads or 'all'}"


def _session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


_LABELS = {"weight_only": "quant.weight_only (GPTQ, per-channel) + fine-tune",
           "single": "dynamic.any_precision {bits: [b]} (one width)",
           "qat": "quant.qat (LSQ, w b / a8)",
           "qat_ste": "quant.qat {lsq: false} (STE, min/max scales, w b / a8)"}


def _markdown(out: dict, args) -> str:
    anyp, sep = out["any_precision"], out["separate"]
    header = ["weights", "any-precision (one artifact)", *[_LABELS[n] for n in sep],
              "any-precision - best separate", "weight SQNR (dB)"]
    lines = [f"# Any-precision ResNet-20, Fashion-MNIST ({args.train} training images, "
             f"{args.epochs:g} fine-tune epochs each, {args.test} test images)", "",
             f"Float: {100 * out['float_accuracy']:.2f}%. One artifact of int{args.bits[0]} "
             f"codes: {anyp['artifact_bytes'] / 1024:.1f} KiB; precision chosen with "
             "load_artifact(path, bits=b); accuracy of each precision's ONNX model on ONNX "
             "Runtime.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in args.bits:
        a = anyp["bits"][b]["accuracy"]
        others = [sep[n][b]["accuracy"] for n in sep]
        ran = [o for o in others if o is not None]
        best = max(ran) if ran else None
        cells = [f"{b}-bit", f"{100 * a:.2f}%",
                 *["fails on ORT" if o is None else f"{100 * o:.2f}%" for o in others],
                 "-" if best is None else f"{100 * (a - best):+.2f}",
                 f"{anyp['bits'][b]['weight_sqnr_db']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{out['command'].strip()}`. The any-precision model trains every "
              f"width on each batch ({len(args.bits)} forward/backward passes per step) in "
              f"{anyp['seconds']:.0f} s; separately quantized models: "
              + ", ".join(f"{n} {sum(v['seconds'] for v in sep[n].values()):.0f} s"
                          for n in sep) + ".", "",
              *[f"{_LABELS[n]} at {b} bits did not run: {e['error']}\n" for n in sep
                for b, e in sep[n].items() if e.get("error")],
              f"Machine: {out['machine']}; load average at the end "
              f"{', '.join(f'{v:.1f}' for v in out['load_average'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
