"""Apply a recipe: train or load the baseline, run each step, measure every stage, write a report.

An interrupted run keeps its finished stages (and a baseline training its last finished
epoch); `--resume` continues after the last one. Progress goes to stderr: bars on a terminal, one
line per epoch and stage in a file or pipe; `--quiet` prints only errors and the final table.
"""

from __future__ import annotations

from pathlib import Path

HELP = "run a recipe (YAML) and write metrics, artifacts and a report"
RESUMABLE = True


def add_run_options(parser, *, default_output: str | None = None) -> None:
    where = default_output or "the recipe's `output:`"
    parser.add_argument("--output", metavar="DIR", default=default_output,
                        help=f"output folder (default: {where})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run after its last finished stage")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace a previous run in the output folder")
    parser.add_argument("--quiet", action="store_true",
                        help="print only errors and the final stage table")
    parser.add_argument("--max-memory", metavar="SIZE", default=None,
                        help="resident-memory budget for training, calibration and evaluation, "
                             "e.g. 2GB: batches are split to fit, or the run is refused up "
                             "front with the amount needed")


def add_arguments(parser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="recipe file, e.g. recipes/demo.yaml")
    add_run_options(parser)


def run_and_print(recipe_path: Path | str, args) -> int:
    from lighten.recipe import load_recipe
    from lighten.report import format_stage_table, write_report
    from lighten.runner import run_recipe

    recipe = load_recipe(recipe_path)
    with _quiet_warnings(args.quiet):
        result = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.quiet, output=args.output,
                            max_memory=getattr(args, "max_memory", None))
    out = Path(result.output_dir)
    if (out / "report.html").is_file() and (out / "report.md").is_file():
        md, html = out / "report.md", out / "report.html"
    else:
        md, html = write_report(out)
    print(format_stage_table(result.rows))
    if args.quiet:
        return 0
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nreport: {html}  (markdown: {md})")
    return 0


def _quiet_warnings(quiet: bool):
    """--quiet: library warnings (torch's exporter, ...) are not errors, so not printed."""
    import contextlib
    import warnings

    if not quiet:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def run(args) -> int:
    return run_and_print(args.recipe, args)
