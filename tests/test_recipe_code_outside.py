"""run.json names the ``python:`` files a recipe runs from outside its own folder."""

from __future__ import annotations

import json
import textwrap

from lighten import runner
from lighten.recipe import load_recipe
from tests.test_runner import MODEL_FILE


def _recipe(folder, model_ref: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        name: outside
        model: {{python: {model_ref}, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 96, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {folder / "out"}
        steps:
          - prune.magnitude: {{sparsity: 0.5}}
    """))
    return path


def test_a_model_file_outside_the_recipe_folder_is_stated(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "net.py").write_text(MODEL_FILE)
    recipe = load_recipe(_recipe(tmp_path / "recipes", "../shared/net.py:build"))
    assert recipe.code_outside() == [str((tmp_path / "shared" / "net.py").resolve())]
    runner.run_recipe(recipe, progress=False)
    info = json.loads((tmp_path / "recipes" / "out" / "run.json").read_text())
    assert info["code_outside_recipe_folder"] == [str((tmp_path / "shared" / "net.py").resolve())]


def test_a_model_file_beside_the_recipe_is_not(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "net.py").write_text(MODEL_FILE)
    assert load_recipe(_recipe(tmp_path / "recipes", "net.py:build")).code_outside() == []
