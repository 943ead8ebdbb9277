"""A new user's mistakes, round 3: one clear message each, nothing already written lost."""

import json
import shutil
import textwrap

import pytest
import torch
from torch import nn

from lighten import runner
from lighten.artifact import load_artifact
from lighten.cli.main import main
from lighten.errors import CheckpointError, ExportError, ModelError, RecipeError
from lighten.export import export_onnx
from lighten.models import read_state_dict
from lighten.recipe import load_recipe

MODEL = """
from torch import nn
def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
"""

DATA = """
import torch
from torch.utils.data import TensorDataset
def stray_label():
    x, y = torch.randn(16, 1, 8, 8), torch.zeros(16).long()
    y[3] = 7  # one label out of range for a 4-class model
    return TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:])
"""


def write_recipe(folder, *, data="{name: synthetic, samples: 64, input_shape: [1, 8, 8], "
                 "num_classes: 4}", steps="[{prune.magnitude: {sparsity: 0.5}}]", output="out"):
    (folder / "net.py").write_text(MODEL)
    (folder / "data.py").write_text(DATA)
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(f"""
        name: r3
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {data}
        train: {{epochs: 1, batch_size: 32}}
        deploy: {{backend: torch, latency_runs: 3}}
        measure: {{robustness: false}}
        steps: {steps}
        output: {folder / output}
    """))
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished two-stage run; tests copy it before damaging it."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = load_recipe(write_recipe(folder))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTEN_CACHE", str(folder / "cache"))
        runner.run_recipe(recipe, progress=False)
    return folder


def copy_run(finished, tmp_path):
    """The finished run copied to tmp_path/out, and its recipe (same hash: same files)."""
    shutil.copytree(finished / "out", tmp_path / "out")
    return load_recipe(finished / "recipe.yaml"), tmp_path / "out"


def snapshot(out):
    return {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- output folder


@pytest.mark.parametrize("where", ["out", "out/stages", "parent"])
def test_output_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch, where):
    recipe = load_recipe(write_recipe(tmp_path, output="parent/out" if where == "parent"
                                      else "out"))
    blocker = tmp_path / where
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("precious")
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(RecipeError, match=rf"{blocker} is a file, not a folder; choose "
                                          "another --output"):
        runner.run_recipe(recipe, progress=False)
    assert blocker.read_text() == "precious"


# ----------------------------------------------------------------------------- resume


def test_resume_of_a_finished_run_keeps_files_and_notes_the_baseline_once(finished, tmp_path):
    recipe, out = copy_run(finished, tmp_path)
    stages = {p.name: p.read_bytes() for p in (out / "stages").glob("*.safetensors")}
    result = runner.run_recipe(recipe, resume=True, progress=False, output=out)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert {p.name: p.read_bytes() for p in (out / "stages").glob("*.safetensors")} == stages
    assert sum(n.startswith("baseline:") for n in result.notes) == 1
    state = json.loads((out / "state.json").read_text())
    assert sum(n.startswith("baseline:") for n in state["notes"]) == 1


@pytest.mark.parametrize("damage, message", [
    ("stages/01-prune.magnitude.safetensors", "01-prune.magnitude.safetensors is missing"),
    ("reference_logits.safetensors", "reference_logits.safetensors is missing"),
])
def test_resume_with_a_missing_file_says_how_to_start_over(finished, tmp_path, damage, message):
    recipe, out = copy_run(finished, tmp_path)
    (out / damage).unlink()
    before = snapshot(out)
    with pytest.raises(RecipeError, match=rf"cannot resume the run in {out}: .*{message}; "
                                          "rerun with --overwrite"):
        runner.run_recipe(recipe, resume=True, progress=False, output=out)
    assert snapshot(out) == before


def test_resume_with_a_truncated_stage_says_how_to_start_over(finished, tmp_path):
    recipe, out = copy_run(finished, tmp_path)
    last = out / "stages" / "01-prune.magnitude.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    before = snapshot(out)
    with pytest.raises(RecipeError) as err:
        runner.run_recipe(recipe, resume=True, progress=False, output=out)
    text = str(err.value)
    assert text.startswith(f"cannot resume the run in {out}: ") and "truncated or corrupt" in text
    assert text.endswith("rerun with --overwrite to start it again, or into a new --output")
    assert "re-save it" not in text
    assert snapshot(out) == before


@pytest.mark.parametrize("name, text", [
    ("state.json", "[1]"), ("state.json", "{bad"), ("state.json", '{"version": 1}'),
    ("metrics.jsonl", '{"stage": "baseline"}\n{trunc'),
])
def test_damaged_run_files_are_one_line_and_overwrite_replaces_them(finished, tmp_path, name,
                                                                    text):
    recipe, out = copy_run(finished, tmp_path)
    (out / name).write_text(text)
    before = snapshot(out)
    for resume in (True, False) if name == "state.json" else (True,):
        with pytest.raises(RecipeError, match=rf"{out / name} is corrupt; rerun with "
                                              "--overwrite"):
            runner.run_recipe(recipe, resume=resume, progress=False, output=out)
    assert snapshot(out) == before
    if name == "state.json" and text == "[1]":  # the advice works
        result = runner.run_recipe(recipe, overwrite=True, progress=False, output=out)
        assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]


def test_changed_recipe_on_resume_names_overwrite(finished, tmp_path):
    _, out = copy_run(finished, tmp_path)
    changed = load_recipe(write_recipe(tmp_path, steps="[{prune.magnitude: {sparsity: 0.6}}]"))
    with pytest.raises(RecipeError, match=r"sparsity: .* -> 0.6 changed .* rerun with --overwrite"):
        runner.run_recipe(changed, resume=True, progress=False, output=out)


# ----------------------------------------------------------------------------- recipes, data


def test_near_miss_step_name_suggests_the_step(tmp_path):
    path = write_recipe(tmp_path, steps="[{prune.chanels: {ratio: 0.5}}]")
    with pytest.raises(RecipeError, match=r"unknown step 'prune.chanels'; known steps: .*; "
                                          r"did you mean 'prune.channels'\?$"):
        load_recipe(path)


def test_a_block_given_as_a_scalar_lists_its_keys_not_a_class_name(tmp_path):
    path = write_recipe(tmp_path, steps="[{prune.magnitude: {sparsity: 0.5, finetune: 2}}]")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "finetune: should be a mapping with keys epochs, lr" in text and "(got 2)" in text
    assert "FinetuneConfig" not in text


def test_a_stray_label_explains_the_class_count(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, data="{python: data.py:stray_label}"))
    with pytest.raises(ModelError, match=r"expected logits \(2, 8\); match num_classes to the "
                                         r"data \(its largest label is 7, so 8 classes"):
        runner.run_recipe(recipe, progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- files, CLI


def test_weights_that_are_a_folder_are_not_called_missing(tmp_path):
    folder = tmp_path / "w.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder; pass the weights file inside it"):
        read_state_dict(folder)


def test_export_to_a_folder_or_under_a_file_is_refused(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("precious")
    with pytest.raises(ExportError, match="dir is a folder; pass a file name"):
        export_onnx(model, tmp_path / "dir", input_shape=(1, 2, 2))
    with pytest.raises(ExportError, match="file is a file, not a folder"):
        export_onnx(model, tmp_path / "file" / "m.onnx", input_shape=(1, 2, 2))
    assert (tmp_path / "file").read_text() == "precious"
    assert list((tmp_path / "dir").iterdir()) == []


def test_cli_near_miss_zoo_name_and_plain_safetensors(tmp_path, capsys):
    assert main(["measure", "resnet21"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'resnet20'?" in err
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert main(["check", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "not a lighten artifact" in err and "`MODEL --weights FILE`" in err
    with pytest.raises(CheckpointError, match="lighten.models.load_weights"):
        load_artifact(plain)
