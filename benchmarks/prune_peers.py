"""Structured channel pruning side by side with Torch-Pruning on Fashion-MNIST zoo models.

    python benchmarks/prune_peers.py [--epochs 2] [--models resnet20 mobilenetv2]
                                     [--methods 1 3 4] [--threads 1] [--name prune_peers]
                                     [--runs 100] [--limit-train N] [--out DIR]

Both methods start from the same shipped checkpoint, aim at <= 50% of the baseline MACs with
L2-magnitude channel importance (classifier untouched, per-layer ratios), and get the very same
fine-tuning budget from ``lighten.training.train``. MACs and parameters come from one counter
(``lighten.measure``) for every row, so the budgets are comparable; latency is the ONNX Runtime
backend (the deployment target): all rows of a model timed together in interleaved rounds
after the last row is fine-tuned (``lighten.measure.timing``: the median, ± half the
interquartile range across rounds; "b64 vs baseline" says ≈ where the ranges overlap).
Fine-tuning runs on one torch thread because a second core is usually busy; latency uses two ORT
threads (the load average is recorded). Writes NAME.{json,md} (``--name``, default prune_peers)
to ``--out`` (default benchmarks/results/) after each row.
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
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from bench_timing import ms_cell, ratio_cell, spread_note, time_rows
from torch import nn

from lighten.backends import get_backend
from lighten.data import DataSpec, load_data
from lighten.measure import agreement, count_macs, count_params
from lighten.models import ModelSpec, build_model, load_weights
from lighten.provenance import atomic_write_text, describe_machine, machine, versions
from lighten.prune.structured import ChannelPruneConfig, prune_channels_
from lighten.target import Target
from lighten.training import TrainConfig, evaluate, predict, train

RESULTS = Path(__file__).parent / "results"
WEIGHTS = Path(__file__).parent.parent / "lighten" / "models" / "weights"
SHAPE = (1, 28, 28)
TARGET_MACS = 0.5  # fraction of the baseline MACs kept


def baseline(name: str) -> nn.Module:
    model = build_model(ModelSpec(zoo=name), input_shape=SHAPE, num_classes=10)
    return load_weights(model, WEIGHTS / f"{name}-fashion-mnist.safetensors").eval()


def prune_lighten(model: nn.Module, example: torch.Tensor, data=None, *,
                  target: float = TARGET_MACS, round_to: int | str | None = None,
                  ratios: str | None = None) -> tuple[nn.Module, str]:
    """lighten ``prune.channels`` through its library call: the ratio is bisected inside;
    ``ratios="auto"`` measures each group's sensitivity on 1000 training images first."""
    config = ChannelPruneConfig(target_macs=target, importance="l2", round_to=round_to,
                                ratios=ratios)
    report = prune_channels_(model, config, example,
                             eval_batches=lambda: _training_batches(data, 1000))
    return model, "; ".join(report.notes)


def _training_batches(data, samples: int, batch: int = 250):
    """The first ``samples`` training images, labelled, in batches."""
    for start in range(0, min(samples, len(data.train)), batch):
        x, y = data.train[start:start + batch]
        yield x, y


def _tp_prune(model: nn.Module, example: torch.Tensor, ratio: float,
              round_to: int | None) -> nn.Module:
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=False, ignored_layers=[_classifier(model)],
        round_to=round_to)
    pruner.step()
    return model


def _classifier(model: nn.Module) -> nn.Module:
    """The last Linear layer: its outputs are the class logits."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune_torch_pruning(model: nn.Module, example: torch.Tensor, data=None, *,
                        round_to: int | None = None) -> tuple[nn.Module, str]:
    """Torch-Pruning MetaPruner; its channel ratio is bisected until MACs <= the target.

    With ``round_to`` Torch-Pruning's MACs need not be monotonic in the ratio (every width
    rounds to whole blocks), and the target may be out of reach; the ratios on a 0.01 grid
    are then searched for the largest MACs <= the target, else the smallest MACs reachable."""
    goal = TARGET_MACS * count_macs(model, SHAPE)

    def macs(ratio: float) -> int:
        return count_macs(_tp_prune(copy.deepcopy(model), example, ratio, round_to), SHAPE)

    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs(mid) <= goal else (mid, hi)
    how = f"pruning_ratio {hi:.4f} (bisected)"
    if round_to and macs(hi) > goal:
        grid = {r / 100: macs(r / 100) for r in range(1, 96)}
        fits = {r: m for r, m in grid.items() if m <= goal}
        hi = (max(fits, key=fits.get) if fits else min(grid, key=grid.get))
        how = (f"pruning_ratio {hi:.2f} (grid search; "
               f"{'target reached' if fits else 'target out of reach, closest MACs'})")
    return _tp_prune(model, example, hi, round_to), how


# channels per SIMD block on this CPU: what round_to=auto picks for a target of this machine
BLOCK = Target.this_machine().simd_channel_block
ROUNDED = f"Torch-Pruning round_to={BLOCK}"
METHODS = {"lighten prune.channels": prune_lighten,
           "lighten prune.channels ratios=auto": partial(prune_lighten, ratios="auto"),
           f"lighten prune.channels round_to=auto ({BLOCK})": partial(prune_lighten,
                                                                      round_to="auto"),
           "Torch-Pruning": prune_torch_pruning,
           ROUNDED: partial(prune_torch_pruning, round_to=BLOCK),
           "lighten prune.channels ratios=auto round_to=auto": partial(
               prune_lighten, ratios="auto", round_to="auto")}
# Rounding lands each tool at its own MAC count near the target; this row asks lighten for the
# MACs Torch-Pruning's rounded run actually reached, so accuracy and latency compare at equal
# MACs.
MATCHED = f"lighten prune.channels round_to=auto at {ROUNDED}'s MACs"
MATCH_SOURCE = ROUNDED


def finetune(model: nn.Module, data, epochs: float) -> float:
    """The budget every method gets; returns the seconds it took."""
    start = time.perf_counter()
    cfg = TrainConfig(epochs=epochs, lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", augment=True, seed=0)
    train(model, data.train, cfg, progress=False)
    return time.perf_counter() - start


def measure(model: nn.Module, data, reference: torch.Tensor | None, workdir: Path):
    """Accuracy, agreement with the baseline's top-1, size, compute; the compiled model is
    returned too, for the interleaved timing at the end of the model (:func:`retime`)."""
    model.eval()
    logits = predict(model, data.test)
    compiled = get_backend("onnxruntime", threads=2).compile(
        model, input_shape=SHAPE, workdir=workdir, sample_inputs=data.test[:64][0])
    return {
        "accuracy": evaluate(model, data.test),
        "agreement": agreement(logits, reference) if reference is not None else 1.0,
        "macs": count_macs(model, SHAPE),
        "params": count_params(model)[0],
    }, logits, compiled


def retime(rows: list[dict], compiled: list, runs: int = 100) -> dict:
    """Time every row of a model together in interleaved rounds (rows are made minutes apart
    while fine-tuning shares the CPU; only timing them together makes them comparable): sets
    ``latency_ms_b1`` / ``latency_ms_b64`` and their ``*_spread``; returns how."""
    return time_rows(rows, compiled, runs=runs)


def run_model(name: str, data, epochs: float, work: Path, rows: list[dict], save,
              only: set[str] | None = None, runs: int = 100) -> dict:
    """Baseline then every method; ``save()`` after each row so a cut-off run keeps its rows;
    at the end all rows of the model are timed again, interleaved."""
    model = baseline(name)
    example = data.test[:1][0]
    base, ref, compiled = measure(model, data, None, work / f"{name}-baseline")
    first = len(rows)
    rows.append({"model": name, "method": "baseline", **base})
    timed = [compiled]
    print(_line(rows[-1]), flush=True)
    save()

    def run_method(method: str, prune, tag: str) -> None:
        pruned, how = prune(copy.deepcopy(model), example, data)
        before_ft = evaluate(pruned, data.test)
        seconds = finetune(pruned, data, epochs)
        row, _, compiled = measure(pruned, data, ref, work / f"{name}-{tag}")
        rows.append({"model": name, "method": method, "how": how,
                     "accuracy_pruned": before_ft, "finetune_s": round(seconds, 1), **row})
        timed.append(compiled)
        print(_line(rows[-1]), flush=True)
        save()

    for i, (method, prune) in enumerate(METHODS.items()):
        if only is None or method in only:
            run_method(method, prune, str(i))
    reached = next((r["macs"] for r in rows
                    if r["model"] == name and r["method"] == MATCH_SOURCE), None)
    if reached is not None and (only is None or MATCHED in only):
        run_method(MATCHED, partial(prune_lighten, target=min(reached / base["macs"] + 1e-6,
                                                              0.99), round_to="auto"),
                   "matched")
    how = retime(rows[first:], timed, runs)
    save(how)
    return how


def _line(row: dict) -> str:
    return f"{row['model']} / {row['method']}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items() if k not in ("model", "method"))


def markdown(rows: list[dict], epochs: float, timing: dict | None = None) -> str:
    head = ("| model | method | acc. after prune | acc. after fine-tune | agreement | MACs | "
            "params | ORT b1 ms | ORT b64 ms | b64 vs baseline |\n|" + "---|" * 10)
    lines = [f"Fine-tune budget: {epochs:g} epochs (SGD lr 0.01, cosine, augment), the same for "
             f"every method; MAC target {TARGET_MACS:.0%} of baseline.", "", head]
    base = {}
    for r in rows:
        base.setdefault(r["model"], r)
        b = base[r["model"]]
        pruned = f"{r['accuracy_pruned']:.4f}" if "accuracy_pruned" in r else "-"
        lines.append(
            f"| {r['model']} | {r['method']} | {pruned} | {r['accuracy']:.4f} | "
            f"{r['agreement']:.4f} | {r['macs'] / 1e6:.2f}M ({r['macs'] / b['macs']:.1%}) | "
            f"{r['params'] / 1e3:.1f}k ({r['params'] / b['params']:.1%}) | "
            f"{ms_cell(r, 'latency_ms_b1', 3)} | {ms_cell(r, 'latency_ms_b64')} | "
            f"{ratio_cell(r, b)} |")
    if timing:
        lines += ["", spread_note(timing)]
    return "\n".join(lines) + "\n"


def footer(result: dict) -> str:
    m = result["machine"]
    limit = (f"\nFine-tuned on the first {result['limit_train']} training images only (a "
             "validation run, not the benchmark).\n" if result.get("limit_train") else "")
    return (f"{limit}\n`{result['command']}` -- torch-pruning {result['torch_pruning']}, "
            f"{describe_machine(m)}, wall {result['wall_s']:.0f} s, load "
            f"average (1 min) {result['loadavg_before'][0]:.1f} before / "
            f"{result['loadavg_after'][0]:.1f} after: latency is noisy on a shared machine.\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    parser.add_argument("--methods", nargs="+", type=int, default=None,
                        help="run only these rows, numbered as listed: "
                        + "; ".join(f"{i}: {m}" for i, m in enumerate([*METHODS, MATCHED])))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for fine-tuning")
    parser.add_argument("--name", default="prune_peers", help="results file stem under --out")
    parser.add_argument("--runs", type=int, default=100,
                        help="timed runs per row at batch 64 (x4 at b1)")
    parser.add_argument("--limit-train", type=int, default=None,
                        help="fine-tune (and score ratios: auto) on the first N training images "
                        "(a quick validation, not the benchmark)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for NAME.{json,md} (a trial run: somewhere in /tmp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.limit_train))
    load_before, start, rows = os.getloadavg(), time.perf_counter(), []
    timing: dict = {}
    command = shlex.join(["python", "benchmarks/prune_peers.py",
                          *(sys.argv[1:] if argv is None else argv)])

    def save(how: dict | None = None) -> None:
        timing.update(how or {})
        result = {"command": command, "limit_train": args.limit_train, "timing": timing,
                  "rows": rows, "epochs": args.epochs, "target_macs": TARGET_MACS,
                  "torch_pruning": metadata.version("torch-pruning"), "versions": versions(),
                  "machine": machine(), "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg(),
                  "wall_s": round(time.perf_counter() - start, 1)}
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out / f"{args.name}.md",
                          markdown(rows, args.epochs, timing) + footer(result))

    names = [*METHODS, MATCHED]
    only = None if args.methods is None else {names[i] for i in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if not (WEIGHTS / f"{name}-fashion-mnist.safetensors").exists():
                print(f"{name}: no shipped checkpoint yet, skipped", flush=True)
                continue
            run_model(name, data, args.epochs, Path(tmp), rows, save, only, args.runs)
    print(markdown(rows, args.epochs, timing))
    print(f"wall {time.perf_counter() - start:.0f} s; load average before {load_before}, "
          f"after {os.getloadavg()}")


if __name__ == "__main__":
    main()
