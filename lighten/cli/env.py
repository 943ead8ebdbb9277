"""Versions and hardware, to paste into a bug report next to any timing you quote."""

from __future__ import annotations

HELP = "print library versions and machine facts (for bug reports)"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    import json

    from lighten.provenance import machine, versions

    facts = {"versions": versions(), "machine": machine()}
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for section, values in facts.items():
        print(f"{section}:")
        width = max(len(k) for k in values)
        for key, value in values.items():
            print(f"  {key.ljust(width)}  {'-' if value is None else value}")
    return 0
