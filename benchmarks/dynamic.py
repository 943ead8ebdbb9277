"""Early exit / gating on ResNet-20 / Fashion-MNIST: mean executed MACs and batch-1 latency.

    python benchmarks/dynamic.py [--train 12000] [--head-epochs 1] [--epochs 1] [--max-drop 0.5]
        [--margin 1.5] [--holdout 0.1] [--head auto] [--freeze-backbone] [--exit-distill 0]
        [--lr-scale 0.1] [--test 10000] [--latency-samples 1000] [--rounds 7] [--threads 2]
        [--quick] [--out DIR]
    python benchmarks/dynamic.py --step gating [--target-macs 0.7] [--max-drop 0.5]
        [--margin 1.5] [--budget per_gate] [--gate-distill 0.5] [--head-epochs: gate epochs]
        [--epochs] [--lr-scale] ...

Starts from the shipped ResNet-20 Fashion-MNIST weights (lighten/models/weights), applies
``lighten.compress(model, {"dynamic.early_exit": {...}}, data=...)`` on ``--train`` training
images (10% of them held out for the thresholds), and measures on the test set:

* accuracy and mean executed MACs per sample (each sample's exit, counted by the runtime);
* batch-1 latency per sample, mean over ``--latency-samples`` test images, of three deployed
  forms timed together in interleaved rounds on the same images: the baseline's single ONNX
  graph, the per-segment ONNX Runtime loop (:mod:`lighten.dynamic.runtime`) and the one-graph
  ``If`` form (:mod:`lighten.dynamic.onnx_if`); speed is the median of same-round ratios to the
  baseline with their IQR.

Writes ``dynamic.{json,md}`` to ``--out`` (default benchmarks/results/). Latency measured while
other jobs share the CPU is noise: rerun on a quiet machine for the README.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=12000, help="training images used")
    ap.add_argument("--head-epochs", type=float, default=1.0)
    ap.add_argument("--epochs", type=float, default=1.0, help="joint fine-tune epochs")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--margin", type=float, default=1.5,
                    help="standard errors of the held-out drop kept as margin")
    ap.add_argument("--freeze-backbone", action="store_true",
                    help="the fine-tune trains the exit heads only (the final exit stays)")
    ap.add_argument("--exit-distill", type=float, default=0.0,
                    help="self-distillation weight of each exit from the final exit")
    ap.add_argument("--lr-scale", type=float, default=0.1, help="fine-tune lr / train lr")
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--head", choices=["auto", "conv2", "conv", "pool"], default="auto",
                    help="early exit: exit head kind")
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--latency-samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--step", choices=["early_exit", "gating"], default="early_exit")
    ap.add_argument("--target-macs", type=float, default=0.7,
                    help="gating: mean MAC ratio the gates are trained to")
    ap.add_argument("--gate-threshold", choices=["max_drop", "target_macs"], default="max_drop",
                    help="gating: the threshold is calibrated on held-out data to max_drop (with "
                    "margin) or to target_macs")
    ap.add_argument("--budget", choices=["per_gate", "total"], default="per_gate",
                    help="gating: budget loss form")
    ap.add_argument("--gate-distill", type=float, default=1.0,
                    help="gating: soft-target weight from the ungated model")
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the script runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lighten-bench-"
                    "dynamic", help="trained early-exit models, reused by a rerun")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.head_epochs, args.epochs = 1500, 0.3, 0.2
        args.test, args.latency_samples, args.rounds = 500, 100, 3

    import onnxruntime as ort

    import lighten
    from lighten.backends import default_threads, get_backend
    from lighten.data import DataSpec, load_data
    from lighten.dynamic.onnx_if import build_if_graph
    from lighten.dynamic.runtime import SegmentRuntime, export_segments, time_batch1
    from lighten.models import ZOO, load_weights, shipped_checkpoint
    from lighten.training import TrainConfig

    threads = args.threads or default_threads()
    torch.manual_seed(0)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train,
                              limit_test=args.test))
    model = load_weights(ZOO["resnet20"](num_classes=10, input_shape=(1, 28, 28)),
                         shipped_checkpoint("resnet20", "fashion-mnist"))
    model.eval()
    x_test = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y_test = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    work = Path(tempfile.mkdtemp(prefix="bench-dynamic-"))

    base = get_backend("onnxruntime", threads=threads).compile(
        model, inputs=data.task.inputs, workdir=work / "baseline", sample_inputs=(x_test[:64],))
    chunks = [x_test[i:i + 256].numpy() for i in range(0, len(x_test), 256)]
    base_acc = float((np.concatenate([base(c) for c in chunks]).argmax(-1) == y_test).mean())
    from lighten.measure.macs import count_macs

    base_macs = count_macs(model, data.task)

    train_cfg = TrainConfig(epochs=1, lr=0.1, batch_size=128, optimizer="sgd", momentum=0.9,
                            weight_decay=5e-4, schedule="cosine", augment=True)
    if args.step == "gating":
        return run_gating(args, argv, model, data, base, base_acc, base_macs, x_test, y_test,
                          chunks, train_cfg, threads)
    step = {"max_drop": args.max_drop, "margin": args.margin, "head_epochs": args.head_epochs,
            "holdout": args.holdout, "freeze_backbone": args.freeze_backbone,
            "exit_distill": args.exit_distill, "head": args.head,
            "finetune": {"epochs": args.epochs, "lr_scale": args.lr_scale}}
    # the trained step is cached (an artifact + its report), so a re-measurement skips training
    key = json.dumps({"train": args.train, "step": step}, sort_keys=True)
    cache = args.cache / f"early_exit-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (cache / "model.safetensors").is_file():
        from lighten.artifact import load_artifact
        from lighten.verb import Report

        multi, _ = load_artifact(cache / "model.safetensors")
        cached = json.loads((cache / "report.json").read_text())
        report, seconds = Report.from_dict(cached["report"]), cached["seconds"]
    else:
        from lighten.artifact import save_artifact

        start = time.perf_counter()
        multi, report = lighten.compress(model, {"dynamic.early_exit": step}, data=data,
                                         train=train_cfg, progress=True)
        seconds = time.perf_counter() - start
        cache.mkdir(parents=True, exist_ok=True)
        save_artifact(multi, cache / "model.safetensors", model_spec={"zoo": "resnet20"},
                      input_shape=[1, 28, 28], num_classes=10, task=data.task)
        (cache / "report.json").write_text(json.dumps({"report": report.to_dict(),
                                                       "seconds": seconds}))
    multi.eval()

    seg_dir = work / "segments"
    files = export_segments(multi, seg_dir, x_test[:1])
    runtime = SegmentRuntime(seg_dir, threads=threads)
    logits, exits = (np.concatenate(p) for p in zip(*(runtime(c) for c in chunks), strict=True))
    correct = logits.argmax(-1) == y_test
    costs = np.asarray(multi.exit_macs, dtype=float)
    if_path = work / "if_graph.onnx"
    build_if_graph(files, runtime.thresholds, runtime.criterion, 10, if_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if_session = ort.InferenceSession(str(if_path), opts, providers=["CPUExecutionProvider"])
    if_logits = np.concatenate([if_session.run(None, {"input": c})[0] for c in chunks])
    base_session = base._session
    timing = time_batch1(runtime, x_test[:args.latency_samples].numpy(), rounds=args.rounds,
                         others={"baseline": lambda x: base_session.run(None, {"input": x}),
                                 "if_graph": lambda x: if_session.run(None, {"input": x})})

    def vs_base(name):
        r = [a / b for a, b in zip(timing[name]["rounds"], timing["baseline"]["rounds"],
                                   strict=True)]
        low, med, high = np.percentile(r, [25, 50, 75])
        return {"median": float(med), "spread": [float(low), float(high)]}

    mean_macs = float(costs[exits].mean())
    result = {
        "model": "resnet20", "data": "fashion-mnist", "threads": threads,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "step": step, "step_seconds": seconds, "summary": report.summary.get("dynamic"),
        "baseline": {"accuracy": base_acc, "macs": base_macs,
                     "latency_ms_b1": timing["baseline"]["median"],
                     "latency_ms_b1_spread": timing["baseline"]["spread"]},
        "early_exit": {
            "accuracy": float(correct.mean()), "mean_macs": mean_macs,
            "macs_ratio": mean_macs / base_macs,
            "if_graph_matches_loop": float(np.abs(if_logits - logits).max()),
            "exits": [{"name": runtime.exit_names[i], "share": float((exits == i).mean()),
                       "accuracy": float(correct[exits == i].mean()) if (exits == i).any()
                       else None, "macs": int(costs[i])} for i in range(len(costs))],
        },
        "latency": {name: {**timing[name], **({"ratio_to_baseline": vs_base(name)}
                                              if name != "baseline" else {})}
                    for name in ("baseline", "dynamic", "if_graph", "full")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dynamic-quick" if args.quick else "dynamic"
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{tag}.md").write_text(render(result, argv))
    print(render(result, argv))
    return 0


def run_gating(args, argv, model, data, base, base_acc, base_macs, x_test, y_test, chunks,
               train_cfg, threads) -> int:
    """dynamic.gating on the same baseline: accuracy, mean executed MACs and batch-1 latency
    of the gated graph (an If per gate) against the baseline graph, on the same test images."""
    import sys

    import onnx

    import lighten
    from lighten.dynamic.runtime import _interleaved, _session_fn

    step = {"target_macs": args.target_macs, "gate_epochs": args.head_epochs,
            "max_drop": args.max_drop if args.gate_threshold == "max_drop" else None,
            "margin": args.margin,
            "budget": args.budget, "distill": args.gate_distill,
            "holdout": args.holdout, "finetune": {"epochs": args.epochs,
                                                  "lr_scale": args.lr_scale}}
    # the trained gated model is cached (an artifact + its report, keyed by what training
    # reads), so a rerun with another max_drop / margin only recalibrates the threshold
    trained = {k: v for k, v in step.items() if k not in ("max_drop", "margin")}
    key = json.dumps({"train": args.train, "step": trained}, sort_keys=True)
    cache = args.cache / f"gating-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (cache / "model.safetensors").is_file():
        gm, report, seconds = recalibrate(cache, model, data, step)
    else:
        from lighten.artifact import save_artifact

        start = time.perf_counter()
        gm, report = lighten.compress(model, {"dynamic.gating": step}, data=data,
                                      train=train_cfg, progress=True)
        seconds = time.perf_counter() - start
        cache.mkdir(parents=True, exist_ok=True)
        save_artifact(gm, cache / "model.safetensors", model_spec={"zoo": "resnet20"},
                      input_shape=[1, 28, 28], num_classes=10, task=data.task)
        (cache / "report.json").write_text(json.dumps({"report": report.to_dict(),
                                                       "seconds": seconds}))
    path = Path(tempfile.mkdtemp(prefix="bench-gating-")) / "gated.onnx"
    onnx.save(gm.onnx_graph(data.task.inputs), str(path))
    gated = _session_fn(path, threads)
    acc = float((np.concatenate([gated(c) for c in chunks]).argmax(-1) == y_test).mean())
    opened = torch.cat([gm.decisions(torch.from_numpy(c)) for c in chunks])
    macs = float(gm.executed_macs(opened).mean())
    one = [np.ascontiguousarray(x_test[i:i + 1].numpy()) for i in range(args.latency_samples)]
    base_session = base._session
    t = _interleaved({"baseline": lambda x: base_session.run(None, {"input": x}),
                      "gated": gated}, one, args.rounds)
    ratios = np.percentile([g / b for g, b in zip(t["gated"]["rounds"], t["baseline"]["rounds"],
                                                  strict=True)], [25, 50, 75])
    result = {"step": step, "step_seconds": seconds, "summary": report.summary.get("dynamic"),
              "baseline": {"accuracy": base_acc, "macs": base_macs, **t["baseline"]},
              "gated": {"accuracy": acc, "mean_macs": macs, "macs_ratio": macs / base_macs,
                        **t["gated"], "ratio": [float(r) for r in ratios],
                        "blocks": [{"name": gm.chain[p], "share": float(opened[:, i].float()
                                                                        .mean())}
                                   for i, p in enumerate(gm.gated)]}}
    cmd = "python benchmarks/dynamic.py " + " ".join(argv if argv is not None else sys.argv[1:])
    g = result["gated"]
    md = "\n".join([
        "# Gating: ResNet-20 on Fashion-MNIST", "",
        f"Command: `{cmd.strip()}` ({threads} threads; step took {seconds:.0f} s); "
        f"{args.test} test images; latency: mean per sample at batch 1 over "
        f"{args.latency_samples} images, {args.rounds} interleaved rounds.", "",
        "| model | accuracy | Δ pts | mean MACs / sample | MAC ratio | b1 ms / sample | vs "
        "baseline (same-round ratio [IQR]) |",
        "|---|---|---|---|---|---|---|",
        f"| baseline | {base_acc:.2%} | - | {base_macs / 1e6:.2f} M | 1.00 | "
        f"{t['baseline']['median']:.3f} | - |",
        f"| gated (If per gate) | {acc:.2%} | {(acc - base_acc) * 100:+.2f} | "
        f"{macs / 1e6:.2f} M | {macs / base_macs:.2f} | {t['gated']['median']:.3f} | "
        f"{ratios[1]:.2f}x [{ratios[0]:.2f}, {ratios[2]:.2f}] |", "",
        "| block | share of test samples that run it |", "|---|---|",
        *[f"| {b['name']} | {b['share']:.1%} |" for b in g["blocks"]], "",
        *calibration_lines(result["summary"] or {}, args), f"Machine: {machine(threads)}.", ""])
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dynamic-gating-quick" if args.quick else "dynamic-gating"
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{tag}.md").write_text(md)
    print(md)
    return 0


def machine(threads) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_timing import machine_line

    return machine_line(threads)


def recalibrate(cache: Path, model, data, step: dict):
    """The cached gated model, its threshold calibrated again to this run's max_drop / margin
    on the same held-out split (the step's seeded split, seed 0) against the same reference."""
    from torch.utils.data import Subset

    from lighten.artifact import load_artifact
    from lighten.dynamic.early_exit import holdout_split
    from lighten.dynamic.gating import _correct, _tensors, calibrate_threshold
    from lighten.verb import Report

    gm, _ = load_artifact(cache / "model.safetensors")
    cached = json.loads((cache / "report.json").read_text())
    report = Report.from_dict(cached["report"])
    _, held = holdout_split(len(data.train), step["holdout"], 0)
    x, y = _tensors(Subset(data.train, held))
    with torch.no_grad():
        reference = _correct(model.eval(), x, y)
    from lighten.measure.macs import count_macs

    base = count_macs(model, data.task)  # the step's base_macs: the model before gating
    cal = calibrate_threshold(gm.eval(), x, y, base_macs=base, reference=reference,
                              max_drop=step["max_drop"], margin=step["margin"],
                              target_macs=None if step["max_drop"] is not None
                              else step["target_macs"])
    summary = report.summary.setdefault("dynamic", {})
    summary.update({"thresholds": gm.threshold.tolist(), "held_out_samples": len(held),
                    "held_out_macs_ratio": cal["macs_ratio"], "held_out_accuracy": cal["accuracy"],
                    "held_out_reference_accuracy": cal["reference_accuracy"],
                    "held_out_drop": cal["drop"], "max_drop": step["max_drop"],
                    "margin": step["margin"], "target_met": cal["met"], "curve": cal["curve"],
                    "recalibrated_from_cache": str(cache)})
    return gm, report, cached["seconds"]


def calibration_lines(summary: dict, args) -> list[str]:
    """The gate threshold's calibration on held-out training images: what it chose and the
    MACs / accuracy trade-off of every threshold it tried."""
    if "held_out_macs_ratio" not in summary:
        return []
    goal = (f"max_drop {summary['max_drop']} with a {summary['margin']}-standard-error margin"
            if summary.get("max_drop") is not None else f"target_macs {args.target_macs}")
    return [
        f"Threshold calibrated on {summary['held_out_samples']} held-out *training* images to "
        f"{goal}: there {summary['held_out_macs_ratio']:.2f}x the MACs at "
        f"{summary['held_out_accuracy']:.2%} ({summary['held_out_drop']:+.2f} points lost "
        f"against the model before gating, {summary['held_out_reference_accuracy']:.2%}); "
        f"target met: {summary['target_met']}. Thresholds tried:", "",
        "| threshold | held-out MAC ratio | points lost | + margin |", "|---|---|---|---|",
        *[f"| {c['threshold']:.3f} | {c['macs_ratio']:.3f} | {c['drop']:+.2f} | "
          f"{c['drop_bound']:+.2f} |" for c in summary.get("curve", [])], ""]


def render(r: dict, argv) -> str:
    import sys

    base, ee, lat = r["baseline"], r["early_exit"], r["latency"]

    def ms(name):
        t = lat[name]
        half = (t["spread"][1] - t["spread"][0]) / 2 / t["median"] * 100 if t["median"] else 0
        return f"{t['median']:.3f} ±{half:.0f}%"

    def ratio(name):
        q = lat[name].get("ratio_to_baseline")
        if q is None:
            return "-"
        lo, hi = q["spread"]
        return f"{q['median']:.2f}x [{lo:.2f}, {hi:.2f}]"

    cmd = "python benchmarks/dynamic.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Early exit: ResNet-20 on Fashion-MNIST",
        "",
        f"Command: `{cmd.strip()}` ({r['threads']} threads; step took "
        f"{r['step_seconds']:.0f} s). Thresholds calibrated on "
        f"{r['summary']['held_out_samples']} held-out *training* images to max_drop "
        f"{r['step']['max_drop']}; everything below on {r['args']['test']} test images.",
        "",
        "| model | accuracy | Δ pts | mean MACs / sample | MAC ratio |",
        "|---|---|---|---|---|",
        f"| baseline | {base['accuracy']:.2%} | - | {base['macs'] / 1e6:.2f} M | 1.00 |",
        f"| early exit | {ee['accuracy']:.2%} | {(ee['accuracy'] - base['accuracy']) * 100:+.2f}"
        f" | {ee['mean_macs'] / 1e6:.2f} M | {ee['macs_ratio']:.2f} |",
        "",
        "| exit | share of test samples | accuracy there | MACs |",
        "|---|---|---|---|",
        *[f"| {e['name']} | {e['share']:.1%} | "
          f"{'-' if e['accuracy'] is None else format(e['accuracy'], '.2%')} | "
          f"{e['macs'] / 1e6:.2f} M |" for e in ee["exits"]],
        "",
        f"Batch-1 latency, mean per test sample over {r['args']['latency_samples']} images, "
        f"{r['args']['rounds']} interleaved rounds (median ± half IQR); ratio: median of "
        "same-round ratios to the baseline [IQR].",
        "",
        "| deployed form | ms / sample | vs baseline |",
        "|---|---|---|",
        f"| baseline (one ONNX graph) | {ms('baseline')} | - |",
        f"| early exit: per-segment ORT sessions + loop | {ms('dynamic')} | {ratio('dynamic')} |",
        f"| early exit: one ONNX graph with If | {ms('if_graph')} | {ratio('if_graph')} |",
        f"| same segments, no exit (every segment) | {ms('full')} | {ratio('full')} |",
        "",
        f"The If graph and the loop give the same logits (max |diff| "
        f"{ee['if_graph_matches_loop']:.1e}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
