"""Check that an artifact or a run folder is exactly what was saved: every stored tensor stream
against the sha256 its manifest records, every result file of a run against checksums.json,
every finished stage present and no stray file among the stages. Nothing is built or run.

Exit 0: intact. Exit 2: damaged, with one line per problem (a flipped bit, a truncated file, a
missing or extra stage file). A digest finds damage; it is not a signature.
"""

from __future__ import annotations

HELP = "check an artifact or run folder against the sha256 digests recorded at save time"


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="ARTIFACT|RUN_FOLDER",
                        help="a lighten .safetensors artifact or a `lighten run` output folder")


def run(args) -> int:
    from lighten.errors import CheckpointError
    from lighten.verify import verify_path

    kind, checked, problems = verify_path(args.path)
    what = "tensor streams" if kind == "artifact" else "files and stage streams"
    if not problems:
        print(f"ok: {args.path} ({kind}): {checked} {what} match their recorded sha256")
        return 0
    for problem in problems:
        print(f"damaged: {problem}")
    raise CheckpointError(f"{args.path} ({kind}) failed verification: {len(problems)} "
                          f"problem{'s' if len(problems) > 1 else ''}, first: {problems[0]}")
