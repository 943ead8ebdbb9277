"""Run the packaged demo: LeNet-5 on Fashion-MNIST, pruned, then int8; every stage measured.

The output folder (runs/demo by default) gets metrics.jsonl, the stage artifacts and
report.md / report.html.
"""

from __future__ import annotations

from pathlib import Path

HELP = "run the packaged demo recipe and print the stage table"
RESUMABLE = True


def demo_recipe_path() -> Path:
    return Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def add_arguments(parser) -> None:
    from lighten.cli.run import add_run_options

    add_run_options(parser, default_output="runs/demo")


def run(args) -> int:
    from lighten.cli.run import run_and_print

    # The demo is meant to be rerun: a finished earlier demo is replaced, unless resuming; a
    # folder of other files is not (unless --overwrite says so).
    if not args.resume and not args.overwrite:
        from lighten.run_folder import check_not_foreign

        check_not_foreign(Path(args.output))
        args.overwrite = True
    return run_and_print(demo_recipe_path(), args)
