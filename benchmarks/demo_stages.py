"""The demo's stage table (LeNet-5, Fashion-MNIST: prune 85% + int8 PTQ on ONNX Runtime).

    python benchmarks/demo_stages.py [--quick] [--out DIR]

Runs the packaged demo recipe into runs/bench-demo and copies its stage table to
demo_stages.md under ``--out`` (default benchmarks/results/). The runner times every stage
together in interleaved rounds (``lighten.measure.timing``): the b1/b64 ms columns show the
median ± half the interquartile range, "b64 speed" says ≈ where a stage's range overlaps the
baseline's. ``--quick``: tiny settings (a smoke test, not the table), run in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
from importlib.resources import files
from pathlib import Path

from recipes_table import shrink_recipe

from lighten.provenance import atomic_write_text
from lighten.recipe import load_recipe
from lighten.report import format_stage_table
from lighten.runner import run_recipe

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for demo_stages.md (a trial run: somewhere in /tmp)")
    args = parser.parse_args(argv)
    source = Path(str(files("lighten") / "recipes" / "demo.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            result = run_recipe(shrink_recipe(source, Path(tmp)), overwrite=True,
                                progress=False)
        else:
            result = run_recipe(load_recipe(source), output="runs/bench-demo", overwrite=True)
        table = format_stage_table(result.rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "demo_stages.md", "```\n" + table + "\n```\n")


if __name__ == "__main__":
    main()
