"""Run benchmark recipes and tabulate baseline vs final stage, each row from one recipe run.

    python benchmarks/recipes_table.py                      # every recipe in benchmarks/recipes/
    python benchmarks/recipes_table.py benchmarks/recipes/lenet5-qat4.yaml ...

Writes benchmarks/results/recipes.{json,md}; rows of recipes not run this time are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lighten.provenance import atomic_write_text, describe_machine, machine
from lighten.recipe import load_recipe
from lighten.runner import run_recipe

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def summarize(name: str, rows: list[dict]) -> dict:
    base, final = rows[0], rows[-1]
    return {
        "recipe": name,
        "steps": " → ".join(r["stage"] for r in rows[1:]),
        "baseline_acc": base["accuracy"],
        "final_acc": final["accuracy"],
        "delta_pts": 100 * (final["accuracy"] - base["accuracy"]),
        "agreement": final["agreement"],
        "bytes_ratio": final["bytes"] / base["bytes"],
        "macs_ratio": final["macs"] / base["macs"],
        "latency_b64_ratio": final["latency_ms_b64"] / base["latency_ms_b64"],
        "backend": final["backend"],
        "seconds": sum(r["seconds"] for r in rows[1:]),
    }


def to_markdown(results: dict[str, dict]) -> str:
    lines = ["| recipe | steps | baseline acc | final acc | Δ pts | agreement | bytes × | MACs × "
             "| b64 latency × | step seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        lines.append(
            f"| {r['recipe']} | {r['steps']} | {r['baseline_acc']:.4f} | {r['final_acc']:.4f} | "
            f"{r['delta_pts']:+.2f} | {r['agreement']:.4f} | {r['bytes_ratio']:.3f} | "
            f"{r['macs_ratio']:.3f} | {r['latency_b64_ratio']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    paths = args.recipes or sorted((HERE / "recipes").glob("*.yaml"))
    store = RESULTS / "recipes.json"
    results = json.loads(store.read_text())["results"] if store.is_file() else {}
    for path in paths:
        recipe = load_recipe(path)
        result = run_recipe(recipe, overwrite=True, progress=not args.quiet)
        # rows of earlier runs are kept, possibly from another machine: each row names its own
        results[recipe.name] = {**summarize(recipe.name, result.rows),
                                "machine": describe_machine(machine())}
        print(to_markdown({recipe.name: results[recipe.name]}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(store, json.dumps({"results": results}, indent=2))
    atomic_write_text(RESULTS / "recipes.md", to_markdown(dict(sorted(results.items()))))
    print(to_markdown(dict(sorted(results.items()))))


if __name__ == "__main__":
    main()
