"""Architecture steps on Fashion-MNIST: ``arch.fold`` (exactness, latency folded vs unfolded on
ONNX Runtime and OpenVINO) and ``arch.separable`` on ResNet-20 (params, accuracy after recovery,
latency beside).

    python benchmarks/arch.py [--quick] [--epochs 3] [--train 60000] [--test 10000] [--runs 40]
        [--threads 2] [--measure-latency] [--lr 0.02] [--distill 0.5] [--variants all 0.33]
        [--parts fold separable] [--out benchmarks/results]

Fold: the shipped ResNet-20 and MobileNetV2 checkpoints go through
``lighten.compress(model, "arch.fold", data=...)``; the table gives what was folded/fused, the
max abs logit difference on ``--test`` test images, accuracy before/after, and the four
deployments (unfolded/folded x ORT/OpenVINO) timed together in interleaved rounds in a fresh
process (benchmarks/bench_timing.py). Separable: the shipped ResNet-20 through
``{"arch.separable": {"layers": "auto", "finetune": {"epochs": E, "distill": D}}}`` (and, per
``--variants`` fraction, with ``target_params``) with the checkpoint's own SGD recipe as
``train`` (fine-tune lr ``--lr``), on ``--train`` images; the baseline and every variant are
timed together on ORT and OpenVINO. ``--threads`` also sets PyTorch's threads (training).
``--quick``: 2,000 training images, 0.2 epochs, 1,000 test images, 10 timed runs (a smoke run,
not a result).
Writes ``arch.json`` and ``arch.md`` to ``--out``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_timing  # noqa: E402
from bench_timing import ms_cell, ratio_cell, spread_note, time_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)


def shipped(name: str):
    from lighten.models import ZOO, load_weights, shipped_checkpoint

    model = ZOO[name](num_classes=10, input_shape=SHAPE)
    return load_weights(model, shipped_checkpoint(name, "fashion-mnist")).eval()


def logits(model, xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(xs[i:i + 500]) for i in range(0, len(xs), 500)])


def compile_all(models: dict, backends, threads, work: Path, samples) -> tuple[list, list]:
    from lighten.backends import get_backend

    rows, compiled = [], []
    for backend in backends:
        be = get_backend(backend, threads=threads)
        for kind, m in models.items():
            compiled.append(be.compile(m, input_shape=SHAPE, workdir=work / f"{kind}-{backend}",
                                       sample_inputs=samples))
            rows.append({"model": kind, "backend": backend})
    return rows, compiled


def fold_part(name: str, data, args, work: Path) -> dict:
    from lighten import compress

    model = shipped(name)
    xs, ys = data.test.tensors
    t0 = time.time()
    folded, report = compress(model, "arch.fold", data=data)
    seconds = time.time() - t0
    a, b = logits(model, xs), logits(folded, xs)
    rows, compiled = compile_all({"unfolded": model, "folded": folded}, args.backends,
                                 args.threads, work / name, xs[:64])
    how = time_rows(rows, compiled, runs=args.runs)
    s = report.summary
    ort = [c.info.get("op_types", {}) for c, r in zip(compiled, rows, strict=True)
           if r["backend"] == "onnxruntime"]  # what ORT runs after its own graph fusions
    return {"model": name, "ort_nodes": [sum(o.values()) for o in ort], "ort_ops": ort,
            "max_abs_diff": float((a - b).abs().max()),
            "step_max_abs_diff": s["max_abs_diff"],
            "acc_before": float((a.argmax(1) == ys).float().mean()),
            "acc_after": float((b.argmax(1) == ys).float().mean()),
            "counts": {k: s[k] for k in ("fold", "drop", "reparam", "merge", "fuse")},
            "params": [s["params_before"], s["params_after"]], "seconds": seconds,
            "rows": rows, "timing": how}


def _variant_step(variant: str, args, finetune: bool = True) -> dict:
    """The ``arch.separable`` step of one variant: ``all`` (every eligible conv) or a
    ``target_params`` fraction (``0.33``: the fewest replacements reaching 3x fewer params)."""
    step = {"layers": "auto", "measure_latency": args.measure_latency,
            "finetune": ({"epochs": args.epochs, "lr": args.lr, "distill": args.distill}
                         if finetune else None)}
    if variant != "all":
        step["target_params"] = float(variant)
    return {"arch.separable": step}


def separable_part(data, args, work: Path) -> dict:
    from lighten import compress
    from lighten.measure import count_macs
    from lighten.training import TrainConfig

    model = shipped("resnet20")
    train = TrainConfig(epochs=args.epochs, lr=0.1, batch_size=128, optimizer="sgd",
                        momentum=0.9, weight_decay=5e-4, schedule="cosine", augment=True)
    xs, ys = data.test.tensors
    acc = lambda m: float((logits(m, xs).argmax(1) == ys).float().mean())  # noqa: E731
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    models, variants = {"resnet20": model}, []
    for variant in args.variants:
        # the same replacement without fine-tuning: what the initialisation alone keeps
        t0 = time.time()
        untuned, _ = compress(model, _variant_step(variant, args, finetune=False), data=data,
                              train=train, target=_target(args))
        init_seconds = time.time() - t0
        step = _variant_step(variant, args)
        t0 = time.time()
        sep, report = compress(model, step, data=data, train=train, target=_target(args))
        seconds = time.time() - t0
        name = "separable" if variant == "all" else f"separable {variant}"
        models[name] = sep
        variants.append({"name": name, "variant": variant, "step": step,
                         "acc_after": acc(sep), "acc_init": acc(untuned),
                         "params": params(sep), "macs": count_macs(sep, SHAPE),
                         "replaced": report.summary["replaced"], "seconds": seconds,
                         "init_seconds": init_seconds, "layers": report.layers})
        print(f"{name}: {variants[-1]['acc_after']:.2%} after {seconds:.0f} s", flush=True)
    rows, compiled = compile_all(models, args.backends, args.threads, work / "separable",
                                 xs[:64])
    how = time_rows(rows, compiled, runs=args.runs)
    return {"acc_before": acc(model), "params_before": params(model),
            "macs_before": count_macs(model, SHAPE), "variants": variants, "rows": rows,
            "timing": how}


def _target(args):
    from lighten.target import Target

    return Target.this_machine(threads=args.threads)


def markdown(fold: list[dict], sep: dict | None, args, machine: str) -> str:
    out = ["# Architecture steps on Fashion-MNIST", "",
           f"`python benchmarks/arch.py {' '.join(args.argv)}` — {machine}", "",
           "## arch.fold (shipped checkpoints)", "",
           "| model | folded / fused / reparam / merged / dropped | max abs diff | acc before "
           "→ after | backend | unfolded b1 | folded b1 | unfolded b64 | folded b64 | "
           "folded/unfolded b64 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in fold:
        c = r["counts"]
        what = f"{c['fold']} / {c['fuse']} / {c['reparam']} / {c['merge']} / {c['drop']}"
        for backend in args.backends:
            u, f = (next(x for x in r["rows"] if x["model"] == k and x["backend"] == backend)
                    for k in ("unfolded", "folded"))
            out.append(f"| {r['model']} | {what} | {r['max_abs_diff']:.1e} | "
                       f"{r['acc_before']:.2%} → {r['acc_after']:.2%} | {backend} | "
                       f"{ms_cell(u, 'latency_ms_b1', 3)} | {ms_cell(f, 'latency_ms_b1', 3)} | "
                       f"{ms_cell(u, 'latency_ms_b64')} | {ms_cell(f, 'latency_ms_b64')} | "
                       f"{ratio_cell(f, u)} |")
    if fold:
        nodes = "; ".join(f"{r['model']} {r['ort_nodes'][0]} → {r['ort_nodes'][1]}"
                          for r in fold if len(r.get("ort_nodes", [])) == 2)
        out += ["", "Nodes ONNX Runtime executes after its own graph optimizations (unfolded → "
                f"folded): {nodes}, no BatchNormalization or Relu node in either (PyTorch's "
                "eval-mode ONNX export already folds BN into Conv; ORT fuses Relu and the "
                "residual Add into it), so equal "
                "latency is the expected result on these two models; what the step adds is an "
                "exact, smaller PyTorch model for every later step and backend, and the "
                "re-parameterizations / merges no exporter does.", "",
                spread_note(fold[0]["timing"]), ""]
    if sep is not None:
        p0, m0, a0 = sep["params_before"], sep["macs_before"], sep["acc_before"]
        out += ["## arch.separable: ResNet-20", "",
                "3x3 convs → depthwise 3x3 + pointwise 1x1 (rank-1 SVD init, pointwise weights "
                "refitted layer by layer by least squares on 256 training images), fine-tuned "
                f"{args.epochs:g} epoch(s) on {args.train:,} images with distill "
                f"{args.distill:g} from the original (lr {args.lr:g}, SGD, cosine, augment). "
                "`separable`: every eligible conv (18; the 1-channel stem stays); `separable "
                "0.33`: `target_params: 0.33`, the fewest replacements (largest parameter "
                "savings first) that bring the model to a third of its parameters.", "",
                "| model | convs replaced | params | MACs | accuracy (init → tuned) | step s | "
                "backend | b1 ms | b64 ms | vs ResNet-20 b64 |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        facts = {"resnet20": ("-", p0, m0, f"{a0:.2%}", "-")}
        for v in sep["variants"]:
            facts[v["name"]] = (v["replaced"], v["params"], v["macs"],
                                f"{v['acc_init']:.2%} → {v['acc_after']:.2%}",
                                f"{v['seconds']:.0f}")
        for backend in args.backends:
            base = next(x for x in sep["rows"] if x["model"] == "resnet20"
                        and x["backend"] == backend)
            for kind, (n, p, m, a, sec) in facts.items():
                row = next(x for x in sep["rows"] if x["model"] == kind
                           and x["backend"] == backend)
                out.append(f"| {kind} | {n} | {p:,} | {m / 1e6:.2f} M | {a} | {sec} | "
                           f"{backend} | {ms_cell(row, 'latency_ms_b1', 3)} | "
                           f"{ms_cell(row, 'latency_ms_b64')} | {ratio_cell(row, base)} |")
        out.append("")
        for v in sep["variants"]:
            out.append(f"{v['name']}: params {p0 / v['params']:.1f}x fewer, MACs "
                       f"{m0 / v['macs']:.1f}x fewer, accuracy "
                       f"{100 * (v['acc_after'] - a0):+.2f} points (test set of "
                       f"{args.test:,}); step {v['seconds']:.0f} s (replacement + refit alone "
                       f"{v['init_seconds']:.0f} s).")
        out += ["", spread_note(sep["timing"])]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = bench_timing.bench_parser(__doc__.splitlines()[0], epochs=3.0,
                                       parts=["fold", "separable"], out=RESULTS)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--distill", type=float, default=0.5,
                        help="weight of the soft targets from the original ResNet-20")
    parser.add_argument("--variants", nargs="+", default=["all"],
                        help="arch.separable variants: all (every eligible conv) and/or "
                        "target_params fractions, e.g. all 0.33")
    parser.add_argument("--measure-latency", action="store_true",
                        help="arch.separable chooses layers by timing them on ORT")
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    args = bench_timing.parse_bench_args(parser, argv, train=2000, epochs=0.2, test=1000, runs=10)
    from lighten.data import DataSpec, load_data

    torch.manual_seed(0)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train,
                              limit_test=args.test))
    with tempfile.TemporaryDirectory(prefix="lighten-arch-bench-") as tmp:
        work = Path(tmp)
        fold = ([fold_part(n, data, args, work) for n in ("resnet20", "mobilenetv2")]
                if "fold" in args.parts else [])
        sep = separable_part(data, args, work) if "separable" in args.parts else None
    line = bench_timing.machine_line(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arch.json").write_text(json.dumps(
        {"fold": fold, "separable": sep, "args": {k: v for k, v in vars(args).items()
                                                  if k != "out"}}, indent=1, default=str))
    (args.out / "arch.md").write_text(markdown(fold, sep, args, line))
    print((args.out / "arch.md").read_text())


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
