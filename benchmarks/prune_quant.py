"""ResNet-20 channel-pruned to 50% MACs and then int8 (lighten prune.channels -> quant.ptq) vs
NNCF -> OpenVINO int8 of the *unpruned* model, on Fashion-MNIST.

    python benchmarks/prune_quant.py [--epochs 2] [--threads 2] [--runs 100]
                                     [--limit-train N] [--limit N] [--out DIR]

The two steps run through ``lighten.verb.run_step`` exactly as a recipe runs them (same configs,
one ``StepContext``), with the fine-tune budget of prune_peers.py (SGD lr 0.01, cosine,
augment). Every model is exported once and run on ONNX Runtime and on OpenVINO; NNCF gets the
same float checkpoint and the same 512 calibration images as in quant_peers.py. Accuracy and
top-1 agreement with the float model come from the deployed files on the test set (``--limit``:
the first N); latency: every deployed model timed together in interleaved rounds
(``lighten.measure.timing``: the median, ± half the interquartile range across rounds; ≈ in
the ratio column where two ranges overlap), threads pinned (``--threads`` also sets the torch
threads used for fine-tuning). Writes prune_quant.{json,md} to ``--out``.
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

import torch
from bench_timing import ms_cell, ratio_cell, spread_note, time_rows
from prune_peers import TARGET_MACS, baseline
from quant_peers import RESULTS, SHAPE, evaluate, int8_layers, nncf_openvino

from lighten.backends import get_backend
from lighten.data import DataSpec, load_data
from lighten.measure import count_macs, count_params
from lighten.provenance import atomic_write_text, describe_machine, machine, versions
from lighten.step import StepContext
from lighten.target import Target
from lighten.training import TrainConfig
from lighten.verb import resolve_config, run_step

MODEL = "resnet20"
CALIB = 512  # first training images, for NNCF (as in quant_peers.py)
FLOAT, NNCF = "float / onnxruntime", "NNCF int8 (unpruned) / openvino"
PRUNED_INT8 = "lighten prune.channels -> quant.ptq"


def recipe_steps(epochs: float) -> list[dict]:
    """The two recipe steps, in their YAML form."""
    return [
        {"prune.channels": {"target_macs": TARGET_MACS, "round_to": "auto", "importance": "l2",
                            "finetune": {"epochs": epochs, "lr": 0.01}}},
        {"quant.ptq": {"calibration": "percentile", "calib_samples": CALIB}},
    ]


def run_steps(model, steps: list[dict], ctx: StepContext) -> dict:
    """Apply each step with :func:`lighten.verb.run_step`, as the runner does; keep a copy
    after each."""
    stages = {}
    for entry in steps:
        (name, _), = entry.items()
        _, config = resolve_config(entry)
        start = time.perf_counter()
        model, report = run_step(model, config, ctx)
        stages[name] = (copy.deepcopy(model).eval(), round(time.perf_counter() - start, 1))
        print(f"{name}: {stages[name][1]:.0f} s; " + "; ".join(report.notes), flush=True)
    return stages


def on_both(model, name: str, calib, work: Path, threads: int) -> dict:
    """One verified ONNX export, run by ONNX Runtime and by OpenVINO."""
    ort = get_backend("onnxruntime", threads=threads).compile(
        model, input_shape=SHAPE, workdir=work / name.replace(" ", "_"), sample_inputs=calib[:64])
    ov = get_backend("openvino", threads=threads).compile_file(ort.onnx_path, input_shape=SHAPE)
    return {f"{name} / onnxruntime": ort, f"{name} / openvino": ov}


def bench(args, work: Path) -> tuple[list[dict], dict]:
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.limit_train))
    model = baseline(MODEL)
    calib = torch.stack([data.train[i][0] for i in range(min(CALIB, len(data.train)))])
    n_test = min(args.limit or len(data.test), len(data.test))
    test_x = torch.stack([data.test[i][0] for i in range(n_test)]).numpy()
    labels = torch.tensor([int(data.test[i][1]) for i in range(n_test)])

    train = TrainConfig(lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                        schedule="cosine", augment=True, seed=0)
    ctx = StepContext(data=data, train_config=train, baseline=copy.deepcopy(model),
                      workdir=work, seed=0, progress=False)
    stages = run_steps(copy.deepcopy(model), recipe_steps(args.epochs), ctx)
    pruned, prune_s = stages["prune.channels"]
    final, ptq_s = stages["quant.ptq"]

    deployed = on_both(model, "float", calib, work, args.threads)
    float_path = deployed[FLOAT].onnx_path
    deployed[NNCF] = nncf_openvino(float_path, calib, work, args.threads)["NNCF int8 / openvino"]
    sources = dict.fromkeys(deployed, model)  # MACs/params: int8 keeps its source model's
    for source, name in ((pruned, "lighten prune.channels (float)"), (final, PRUNED_INT8)):
        compiled = on_both(source, name, calib, work, args.threads)
        deployed |= compiled
        sources |= dict.fromkeys(compiled, pruned)

    rows, reference = [], None
    for method, compiled in deployed.items():
        acc, agree, logits = evaluate(compiled, test_x, labels, reference)
        reference = logits if reference is None else reference  # float on ORT comes first
        rows.append({"method": method, "runtime": compiled.backend, "accuracy": acc,
                     "agreement": agree, "bytes": compiled.bytes_on_disk,
                     "macs": count_macs(sources[method], SHAPE),
                     "params": count_params(sources[method])[0],
                     "int8_layers": int8_layers(compiled.info)})
        print(f"{method}: accuracy {acc:.4f}, agreement {agree:.4f}", flush=True)
    timing = time_rows(rows, list(deployed.values()), runs=args.runs)
    return rows, {"timing": timing, "notes": ctx.notes, "prune_s": prune_s, "ptq_s": ptq_s,
                  "steps": recipe_steps(args.epochs), "train": train.model_dump()}


def table(rows: list[dict]) -> str:
    by = {r["method"]: r for r in rows}
    base, nncf = by[FLOAT], by[NNCF]
    lines = ["| method / runtime | acc % | Δ pts | agree % | bytes | MACs | params | b1 ms | "
             "b64 ms | b64 vs NNCF int8 | int8 layers |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['accuracy']:.2f} | "
            f"{100 * (r['accuracy'] - base['accuracy']):+.2f} | {100 * r['agreement']:.2f} | "
            f"{r['bytes']:,} | {r['macs'] / 1e6:.2f}M ({r['macs'] / base['macs']:.0%}) | "
            f"{r['params'] / 1e3:.1f}k | {ms_cell(r, 'latency_ms_b1', 3)} | "
            f"{ms_cell(r, 'latency_ms_b64')} | {ratio_cell(nncf, r)} | {r['int8_layers']} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """The issue's goal, checked on the faster runtime of the pruned int8 model."""
    by = {r["method"]: r for r in rows}
    base, nncf = by[FLOAT], by[NNCF]
    ours = min((r for r in rows if r["method"].startswith(PRUNED_INT8)),
               key=lambda r: r["latency_ms_b64"])
    lost = 100 * (base["accuracy"] - ours["accuracy"])
    cell = ratio_cell(nncf, ours)  # NNCF's time / ours, paired round by round; ≈: noise
    noise = cell == "≈"
    faster = float(cell.rstrip("x")) if not noise and cell != "-" else 1.0
    ok = lost <= 1.0 and faster > 1.0 and not noise
    speed = ("≈ NNCF's b64 speed (the same-round ratios straddle 1)" if noise
             else f"{faster:.2f}x NNCF's b64 speed (same-round ratios)")
    return (f"Goal (<= 1 point lost, faster at b64 than NNCF int8 of the unpruned model): "
            f"{'met' if ok else 'NOT met'} -- {ours['method']}: {lost:.2f} points lost, "
            f"{speed} ({ms_cell(ours, 'latency_ms_b64')} vs {ms_cell(nncf, 'latency_ms_b64')} "
            "ms).")


def footer(result: dict) -> str:
    m, load = result["machine"], result["load_average"]
    limit = (f" Fine-tuned on the first {result['limit_train']} training images only (a "
             "validation run, not the benchmark)." if result["limit_train"] else "")
    return (f"Fine-tune: {result['epochs']:g} epoch(s) (SGD lr 0.01, cosine, augment); MAC target "
            f"{TARGET_MACS:.0%}, round_to auto ({Target.this_machine().simd_channel_block} "
            "here), L2 importance; "
            f"quant.ptq percentile on {CALIB} training images drawn by the step (seeded); "
            f"NNCF: the first {CALIB}.{limit} Accuracy on the first {result['test_images']} "
            f"test images. {spread_note(result['timing'])} {result['threads']} thread(s)."
            f"\n\n`{result['command']}` -- "
            f"{describe_machine(m)}, wall {result['wall_s']:.0f} s, load average "
            f"(1 min) {load[0][0]:.1f} before / {load[1][0]:.1f} after (shared machine).\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2, help="fine-tune epochs after pruning")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100, help="timed runs at batch 64 (x4 at b1)")
    parser.add_argument("--limit-train", type=int, default=None,
                        help="fine-tune on the first N training images (quick validation)")
    parser.add_argument("--limit", type=int, default=None,
                        help="test images to evaluate (default: all 10,000)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for prune_quant.{json,md} (a trial run: somewhere in /tmp)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.runs < 1 or args.epochs <= 0:
        parser.error("need --threads >= 1, --runs >= 1 and --epochs > 0")
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/prune_quant.py",
                          *(sys.argv[1:] if argv is None else argv)])
    load_before, start = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows, run = bench(args, Path(tmp))
    import nncf
    import openvino

    result = {"command": command, "machine": machine(), "threads": args.threads,
              "runs": args.runs, "epochs": args.epochs, "limit_train": args.limit_train,
              "test_images": min(args.limit or 10000, 10000),
              "versions": {**versions(), "openvino": openvino.__version__,
                           "nncf": nncf.__version__},
              "load_average": [load_before, os.getloadavg()],
              "wall_s": round(time.perf_counter() - start, 1), **run, "rows": rows}
    md = f"{table(rows)}\n\n{verdict(rows)}\n\n{footer(result)}"
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "prune_quant.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "prune_quant.md", md)


if __name__ == "__main__":
    main()
