"""(Re)write report.md and report.html of a finished or interrupted run from its metrics."""

from __future__ import annotations

HELP = "write report.md / report.html for a run folder"


def add_arguments(parser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="a run folder holding metrics.jsonl, e.g. runs/demo")


def run(args) -> int:
    from lighten.report import format_stage_table, read_metrics, write_report

    md, html = write_report(args.output_dir)
    print(format_stage_table(read_metrics(args.output_dir)))
    print(f"\nreport: {html}  (markdown: {md})")
    return 0
