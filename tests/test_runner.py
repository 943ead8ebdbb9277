"""End to end: a recipe with a model the zoo does not have, on synthetic data."""

import json
import textwrap

import pytest

from lighten import runner
from lighten.errors import CheckpointError, DataError, RecipeError
from lighten.recipe import load_recipe

MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x + torch.relu(self.conv2(x))   # a residual add
        x = nn.functional.max_pool2d(x, 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))

def build():
    return Net()
"""


def write_recipe(tmp_path, *, steps=None, data=None, extra=""):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    steps = steps or """
      - prune.magnitude: {sparsity: 0.8, finetune: {epochs: 1}}
      - quant.ptq: {bits: 8, calib_samples: 64}
    """
    data = data or "{name: synthetic, samples: 384, input_shape: [1, 8, 8], num_classes: 4}"
    text = textwrap.dedent(f"""
        name: e2e
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {data}
        train: {{epochs: 3, lr: 0.01, batch_size: 32}}
        measure: {{robustness: true, eval_limit: 128}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / "out"}
        steps:
    """) + textwrap.indent(textwrap.dedent(steps), "  ") + extra
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))


def read_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_python_model_runs_through_prune_and_quantize(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    result = runner.run_recipe(recipe, progress=False)
    rows = read_rows(result.output_dir)
    assert [r["stage"] for r in rows] == ["baseline", "prune.magnitude", "quant.ptq"]
    keys = {"stage", "step", "accuracy", "agreement", "params", "nonzero_params", "bytes", "macs",
            "latency_ms_b1", "latency_ms_b64", "backend", "seconds"}
    assert all(keys <= set(r) for r in rows)
    base, pruned, quant = rows
    assert base["accuracy"] > 0.6  # learnable synthetic data, 4 classes
    assert pruned["nonzero_params"] < 0.35 * base["nonzero_params"]
    assert pruned["bytes"] < 0.5 * base["bytes"]
    assert quant["bytes"] < 0.25 * base["bytes"]
    assert quant["agreement"] >= 0.8
    assert all(r["backend"] == "onnxruntime" for r in rows)
    assert (result.output_dir / "report.md").is_file()
    assert (result.output_dir / "report.html").is_file()
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["recipe_hash"] and run["provenance"]["versions"]["torch"].startswith("2.13")


def test_resume_after_interruption_keeps_finished_stages(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path))
    real_apply = runner.step_apply

    def interrupt_at_quant(step, model, ctx):
        if step.name == "quant.ptq":
            raise KeyboardInterrupt
        return real_apply(step, model, ctx)

    monkeypatch.setattr(runner, "step_apply", interrupt_at_quant)
    with pytest.raises(KeyboardInterrupt):
        runner.run_recipe(recipe, progress=False)
    out = tmp_path / "out"
    assert [r["stage"] for r in read_rows(out)] == ["baseline", "prune.magnitude"]
    pruned_artifact = out / "stages" / "01-prune.magnitude.safetensors"
    before = pruned_artifact.read_bytes()

    with pytest.raises(RecipeError, match="already holds a run; pass --resume"):
        runner.run_recipe(recipe, progress=False)

    monkeypatch.setattr(runner, "step_apply", real_apply)
    result = runner.run_recipe(recipe, resume=True, progress=False)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude", "quant.ptq"]
    assert pruned_artifact.read_bytes() == before


def test_bad_inputs_fail_before_touching_earlier_output(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, steps="- prune.magnitude: {sparsity: 0.5}"))
    runner.run_recipe(recipe, progress=False)
    out = tmp_path / "out"
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    missing = write_recipe(tmp_path, data=f"{{name: fashion-mnist, root: {tmp_path / 'nope'}}}")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        runner.run_recipe(load_recipe(missing), overwrite=True, progress=False)

    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 7)
    truncated = write_recipe(tmp_path, extra="")
    text = truncated.read_text().replace("input_shape: [1, 8, 8]}",
                                         "input_shape: [1, 8, 8], weights: w.safetensors}", 1)
    truncated.write_text(text)
    with pytest.raises(CheckpointError):
        runner.run_recipe(load_recipe(truncated), overwrite=True, progress=False)

    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot
