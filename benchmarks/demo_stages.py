"""The demo's stage table (LeNet-5, Fashion-MNIST: prune 85% + int8 PTQ on ONNX Runtime).

    python benchmarks/demo_stages.py

Runs the packaged demo recipe into runs/bench-demo and copies its table to
benchmarks/results/demo_stages.md.
"""

from importlib.resources import files
from pathlib import Path

from lighten.provenance import atomic_write_text
from lighten.recipe import load_recipe
from lighten.report import format_stage_table
from lighten.runner import run_recipe

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    recipe = load_recipe(files("lighten") / "recipes" / "demo.yaml")
    result = run_recipe(recipe, output="runs/bench-demo", overwrite=True)
    table = format_stage_table(result.rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "demo_stages.md", "```\n" + table + "\n```\n")
