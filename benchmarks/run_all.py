"""Run every benchmark in turn (`make bench`). Each writes its table under benchmarks/results/.

    python benchmarks/run_all.py            # the full run: the README's tables
    python benchmarks/run_all.py --quick    # every script at its smallest settings (a smoke
                                            # test, ~5 min), tables written to a temporary folder
    python benchmarks/run_all.py --only prune_quant.py quant_peers.py

The commands are the ones quoted in the README. Every latency is timed with
``lighten.measure.timing`` (all rows of a table together, in interleaved rounds; median and
interquartile range). Full-run time on the project's 2-core machine when it is otherwise idle
(about 2 h 15 min in all; a busy machine makes it slower):

    backend_latency.py                    ~3 min
    demo_stages.py                        ~3 min
    recipes_table.py (17 recipes)         ~50 min  (QAT, AGP and GPTQ recipes dominate)
    quant_peers.py (3 models)             ~10 min
    calibration.py (2 models)             ~5 min
    prune_peers.py resnet20               ~35 min  (7 fine-tunes of 2 epochs on 1 thread)
    prune_peers.py mobilenetv2            ~17 min  (4 fine-tunes of 1 epoch)
    prune_quant.py                        ~5 min
    importance.py                         ~8 min
    int8_architectures.py                 ~5 min

A script that fails does not stop the others; the run exits non-zero and names it at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = [
    ["backend_latency.py", "--backends", "onnxruntime", "openvino", "torch"],
    ["demo_stages.py"],
    ["recipes_table.py", "--quiet"],
    ["quant_peers.py", "--models", "lenet5", "lenet300", "resnet20", "--runs", "50"],
    ["calibration.py", "--models", "lenet5", "resnet20"],
    ["prune_peers.py", "--epochs", "2", "--models", "resnet20"],
    ["prune_peers.py", "--epochs", "1", "--models", "mobilenetv2", "--methods", "2", "4", "5", "6",
     "--name", "prune_peers_mobilenetv2"],
    ["prune_quant.py", "--epochs", "2", "--threads", "2"],
    ["importance.py", "--models", "resnet20", "mobilenetv2", "--epochs", "1"],
    ["int8_architectures.py", "--threads", "2", "--runs", "30", "--epochs", "1", "--train",
     "8000", "--tag", "after"],
]
# the same scripts at their smallest settings: every code path a full run takes, numbers that
# mean nothing (LeNet-5 where a script takes a model, a few hundred images, 3 timed runs)
QUICK = [
    ["backend_latency.py", "--models", "lenet5", "--backends", "onnxruntime", "openvino", "torch",
     "--runs", "3"],
    ["demo_stages.py", "--quick"],
    ["recipes_table.py", "--quick", "--quiet"],
    ["quant_peers.py", "--models", "lenet5", "--calibrations", "minmax", "--calib", "64",
     "--limit", "500", "--runs", "3"],
    ["calibration.py", "--models", "lenet5", "--methods", "minmax", "entropy", "--calib", "64",
     "--limit", "500"],
    ["prune_peers.py", "--epochs", "0.05", "--models", "lenet5", "--methods", "0", "3", "4",
     "--limit-train", "512", "--runs", "3"],
    ["prune_quant.py", "--epochs", "0.05", "--limit-train", "512", "--limit", "500", "--runs",
     "3"],
    ["importance.py", "--models", "lenet5", "--epochs", "0.05", "--limit-train", "512"],
    ["int8_architectures.py", "--archs", "densenet", "--runs", "3", "--epochs", "0.05",
     "--train", "512", "--test", "200", "--tag", "quick"],
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="every script at its smallest settings (a smoke test, ~5 min)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the tables (default: benchmarks/results/; with --quick "
                        "a temporary folder)")
    parser.add_argument("--only", nargs="+", default=None, metavar="SCRIPT",
                        help="run only these scripts (e.g. prune_peers.py)")
    args = parser.parse_args(argv)
    commands = QUICK if args.quick else BENCHMARKS
    if args.only:
        unknown = set(args.only) - {c[0] for c in commands}
        if unknown:
            parser.error(f"unknown script(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(dict.fromkeys(c[0] for c in commands))}")
        commands = [c for c in commands if c[0] in args.only]
    with tempfile.TemporaryDirectory(prefix="lighten-bench-") as tmp:
        out = args.out or (Path(tmp) if args.quick else None)
        failed, start = [], time.perf_counter()
        for script, *rest in commands:
            extra = [] if out is None else ["--out", str(out)]
            print(f"== {script} {' '.join(rest + extra)}", flush=True)
            began = time.perf_counter()
            code = subprocess.run([sys.executable, str(HERE / script), *rest, *extra],
                                  cwd=HERE.parent).returncode
            print(f"== {script}: {'ok' if code == 0 else f'FAILED (exit {code})'} in "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
            if code:
                failed.append(script)
        print(f"== {len(commands) - len(failed)}/{len(commands)} ran in "
              f"{time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}"
                                                       if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
