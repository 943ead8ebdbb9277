"""Channel importance criteria side by side: the same rounded prune.channels, the same fine-tune.

    python benchmarks/importance.py [--models resnet20 mobilenetv2] [--epochs 1]
                                    [--importance l2 group_l2] [--limit-train N] [--out DIR]

Each criterion prunes the shipped checkpoint to 50% of its MACs with ``round_to: auto`` (the
deployment setting: widths in whole SIMD blocks), then gets the fine-tune of prune_peers.py
(SGD lr 0.01, cosine, augment) for ``--epochs``. One seed, one run per row: differences of a few
tenths of a point are within run-to-run noise. No latency is timed here. Writes
importance.{json,md} to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from prune_peers import RESULTS, SHAPE, TARGET_MACS, baseline, finetune

from lighten.data import DataSpec, load_data
from lighten.measure import count_macs
from lighten.provenance import atomic_write_text, describe_machine, machine
from lighten.prune.structured import ChannelPruneConfig, prune_channels_
from lighten.training import evaluate


def markdown(rows: list[dict], epochs: float) -> str:
    lines = [f"prune.channels to {TARGET_MACS:.0%} MACs with round_to auto, then {epochs:g} "
             "epoch(s) of fine-tuning; accuracy on the 10,000 test images.", "",
             "| model | importance | MACs | acc. after prune | acc. after fine-tune | Δ pts |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['importance']} | {r['macs']:.1%} | "
                     f"{r['accuracy_pruned']:.4f} | {r['accuracy']:.4f} | "
                     f"{100 * (r['accuracy'] - r['baseline']):+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2"])
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--importance", nargs="+", default=["l2", "group_l2"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for fine-tuning")
    parser.add_argument("--limit-train", type=int, default=None,
                        help="fine-tune on the first N training images (a quick validation)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for importance.{json,md} (a trial run: somewhere in /tmp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.limit_train))
    command = shlex.join(["python", "benchmarks/importance.py",
                          *(sys.argv[1:] if argv is None else argv)])
    rows = []
    for name in args.models:
        model = baseline(name)
        base_acc, base_macs = evaluate(model, data.test), count_macs(model, SHAPE)
        for importance in args.importance:
            pruned, start = copy.deepcopy(model), time.perf_counter()
            config = ChannelPruneConfig(target_macs=TARGET_MACS, round_to="auto",
                                        importance=importance)
            prune_channels_(pruned, config, data.test[:1][0])
            before = evaluate(pruned, data.test)
            finetune(pruned, data, args.epochs)
            rows.append({"model": name, "importance": importance, "baseline": base_acc,
                         "macs": count_macs(pruned, SHAPE) / base_macs,
                         "accuracy_pruned": before, "accuracy": evaluate(pruned, data.test),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(markdown(rows[-1:], args.epochs).splitlines()[-1], flush=True)
            result = {"command": command, "limit_train": args.limit_train, "rows": rows,
                      "machine": machine()}
            args.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out / "importance.json", json.dumps(result, indent=2) + "\n")
            atomic_write_text(args.out / "importance.md", markdown(rows, args.epochs)
                              + f"\n`{command}` -- {describe_machine(machine())}.\n")


if __name__ == "__main__":
    main()
