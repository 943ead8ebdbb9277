"""Run benchmark recipes and tabulate baseline vs final stage, each row from one recipe run.

    python benchmarks/recipes_table.py                      # every recipe in benchmarks/recipes/
    python benchmarks/recipes_table.py benchmarks/recipes/lenet5-qat4.yaml ...
    python benchmarks/recipes_table.py --quick --out /tmp/bench   # tiny settings: a smoke test

Latency comes from the runner: every stage of a run timed together in interleaved rounds
(``lighten.measure.timing``), the median with the interquartile range as its spread; the
"b64 latency ×" column says ``≈`` where the final stage's range overlaps the baseline's.
Writes recipes.{json,md} to ``--out`` (default benchmarks/results/); rows of recipes not run
this time are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from bench_timing import ratio_cell

from lighten.provenance import atomic_write_text, describe_machine, machine
from lighten.recipe import load_recipe, parse_recipe
from lighten.runner import run_recipe

HERE = Path(__file__).parent
RESULTS = HERE / "results"
QUICK_RECIPES = ("lenet5-ptq4.yaml", "lenet5-channels50.yaml")


def shrink_recipe(path: Path, output: Path, *, epochs: float = 0.05, samples: int = 512):
    """The recipe at ``path`` at its smallest settings (a smoke test, not a result): every
    ``epochs`` in it cut to ``epochs``, the first ``samples`` training and test images, 3
    timed runs, no robustness probes, written under ``output``."""
    raw = yaml.safe_load(Path(path).read_text())

    def cut(node):
        if isinstance(node, dict):
            return {k: (min(v, epochs) if k == "epochs" and isinstance(v, int | float)
                        else cut(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [cut(v) for v in node]
        return node

    raw = cut(raw)
    raw["train"] = {**raw.get("train", {}), "epochs": epochs}  # when there is no checkpoint
    raw["data"] = {**raw.get("data", {}), "limit_train": samples, "limit_test": samples}
    raw["deploy"] = {**raw.get("deploy", {}), "latency_runs": 3}
    raw["measure"] = {**raw.get("measure", {}), "robustness": False}
    raw["output"] = str(output / raw["name"])
    return parse_recipe(raw, source=f"{path} (quick)", base_dir=Path(path).parent)


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
        # both stages' [25th, 75th percentile] across the run's interleaved timing rounds
        "latency_b64_spread": [base.get("latency_ms_b64_spread"),
                               final.get("latency_ms_b64_spread")],
        "backend": final["backend"],
        "seconds": sum(r["seconds"] for r in rows[1:]),
    }


def latency_cell(r: dict) -> str:
    """final / baseline latency at b64; ``≈`` where their spreads overlap."""
    base_spread, final_spread = r.get("latency_b64_spread") or [None, None]
    return ratio_cell({"ms": r["latency_b64_ratio"], "ms_spread": final_spread},
                      {"ms": 1.0, "ms_spread": base_spread}, "ms")


def to_markdown(results: dict[str, dict]) -> str:
    lines = ["| recipe | steps | baseline acc | final acc | Δ pts | agreement | bytes × | MACs × "
             "| b64 latency × | step seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        lines.append(
            f"| {r['recipe']} | {r['steps']} | {r['baseline_acc']:.4f} | {r['final_acc']:.4f} | "
            f"{r['delta_pts']:+.2f} | {r['agreement']:.4f} | {r['bytes_ratio']:.3f} | "
            f"{r['macs_ratio']:.3f} | {latency_cell(r)} | {r['seconds']:.0f} |")
    lines += ["", "b64 latency ×: final stage / baseline at batch 64, both timed in the same "
              "interleaved rounds; ≈: their interquartile ranges overlap (within the noise)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {', '.join(QUICK_RECIPES)} (unless recipes are given) "
                        "at tiny settings, runs under a temporary folder")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for recipes.{json,md} (a trial run: somewhere in /tmp)")
    args = parser.parse_args(argv)
    paths = args.recipes or (
        [HERE / "recipes" / n for n in QUICK_RECIPES] if args.quick
        else sorted((HERE / "recipes").glob("*.yaml")))
    store = args.out / "recipes.json"
    results = json.loads(store.read_text())["results"] if store.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            recipe = shrink_recipe(path, Path(tmp)) if args.quick else load_recipe(path)
            result = run_recipe(recipe, overwrite=True, progress=not args.quiet)
            # rows of earlier runs are kept, possibly from another machine: each row names its
            # own
            results[recipe.name] = {**summarize(recipe.name, result.rows),
                                    "machine": describe_machine(machine())}
            print(to_markdown({recipe.name: results[recipe.name]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(store, json.dumps({"results": results}, indent=2))
    atomic_write_text(args.out / "recipes.md", to_markdown(dict(sorted(results.items()))))
    print(to_markdown(dict(sorted(results.items()))))


if __name__ == "__main__":
    main()
