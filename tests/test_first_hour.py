"""Issue 10, "Friction": what a new user meets in the first hour.

A run record exists (and resumes) while the baseline trains; progress written to a pipe is plain
lines; --quiet; a folder that is not a run is not written into; measure/analyze take a
``python:`` data hook.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lighten.training
from lighten import run_folder, runner
from lighten.cli.main import main
from lighten.data import DataSpec, load_data
from lighten.errors import LightenError, RecipeError
from lighten.models import ZOO
from lighten.recipe import load_recipe
from lighten.training import Callback, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]

MODEL_FILE = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))
"""

DATA_FILE = """
import torch
from torch.utils.data import TensorDataset

def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
"""


def write_recipe(tmp_path: Path, *, epochs: int = 3, output: Path | None = None) -> Path:
    (tmp_path / "net.py").write_text(MODEL_FILE)
    text = textwrap.dedent(f"""
        name: first-hour
        model: {{python: {tmp_path / "net.py"}:build, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 192, input_shape: [1, 8, 8], num_classes: 3}}
        train: {{epochs: {epochs}, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {output or tmp_path / "out"}
        steps:
          - prune.magnitude: {{sparsity: 0.5, finetune: {{epochs: 0}}}}
    """)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))


class StopAfter(Callback):
    """Ctrl-C right after the given (0-based) epoch ends."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, model, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


# --- 1. checkpointed training -------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, optimizer):
    data = load_data(DataSpec(name="synthetic", samples=192, input_shape=[1, 8, 8]))
    cfg = TrainConfig(epochs=3.5, batch_size=32, lr=0.01, optimizer=optimizer, augment=True)

    def fresh():
        torch.manual_seed(0)
        return ZOO["lenet5"](input_shape=(1, 8, 8))

    whole = fresh()
    losses = train(whole, data.train, cfg, progress=False)

    checkpoint = tmp_path / "train.safetensors"
    part = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(part, data.train, cfg, progress=False, checkpoint=checkpoint,
              callbacks=[StopAfter(1)])
    assert checkpoint.is_file()
    # the file is plain safetensors: tensors + JSON metadata, nothing pickled
    assert any(k.startswith("optim.") for k in load_file(str(checkpoint)))
    torch.manual_seed(123)  # another process: other RNG state, other initial weights
    resumed = ZOO["lenet5"](input_shape=(1, 8, 8))
    resumed_losses = train(resumed, data.train, cfg, progress=False, checkpoint=checkpoint)
    assert resumed_losses == pytest.approx(losses, rel=1e-6)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_of_other_training_is_not_used(tmp_path):
    data = load_data(DataSpec(name="synthetic", samples=128, input_shape=[1, 8, 8]))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01)
    checkpoint = tmp_path / "train.safetensors"
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(ZOO["lenet5"](input_shape=(1, 8, 8)), data.train, cfg, progress=False,
              checkpoint=checkpoint, callbacks=[StopAfter(1)])
    other = cfg.model_copy(update={"lr": 0.02})
    torch.manual_seed(0)
    a = ZOO["lenet5"](input_shape=(1, 8, 8))
    train(a, data.train, other, progress=False, checkpoint=checkpoint)
    torch.manual_seed(0)
    b = ZOO["lenet5"](input_shape=(1, 8, 8))
    train(b, data.train, other, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                   b.state_dict().values(), strict=True))


def _interrupt_baseline_after(monkeypatch, epoch: int) -> None:
    """The runner's baseline training gets a callback that presses Ctrl-C after ``epoch``."""
    real = lighten.training.train
    monkeypatch.setattr(lighten.training, "train",
                        functools.partial(real, callbacks=[StopAfter(epoch)]))


def test_run_record_exists_during_baseline_training_and_resume_matches(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path))
    out = tmp_path / "out"

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache-a"))
    whole = runner.run_recipe(recipe, progress=False, output=tmp_path / "whole")
    assert json.loads((whole.output_dir / "run.json").read_text())["status"] == "finished"

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache-b"))
    with monkeypatch.context() as patch:
        _interrupt_baseline_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            runner.run_recipe(recipe, progress=False)
    # the run is on disk although no stage finished: record, state and the epoch checkpoint
    assert json.loads((out / "run.json").read_text())["status"] == "started"
    assert json.loads((out / "state.json").read_text())["done"] == []
    assert (out / run_folder.BASELINE_CHECKPOINT).is_file()
    assert not list((out / "stages").glob("*.safetensors"))
    # a plain rerun refuses (it is a run); --resume continues after the saved epoch
    with pytest.raises(RecipeError, match="already holds a run"):
        runner.run_recipe(recipe, progress=False)
    result = runner.run_recipe(recipe, progress=False, resume=True)
    assert any("continued after epoch 1" in note for note in result.notes), result.notes
    assert not (out / run_folder.BASELINE_CHECKPOINT).exists()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    a = load_file(str(whole.output_dir / "stages" / "00-baseline.safetensors"))
    b = load_file(str(out / "stages" / "00-baseline.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]


# --- 2. progress in a pipe; --quiet -------------------------------------------------------------

def _cli(args: list[str], cwd: Path, env_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTEN_CACHE": str(env_cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lighten.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_progress_in_a_pipe_is_plain_lines_and_quiet_is_quiet(tmp_path):
    recipe = write_recipe(tmp_path, epochs=4)
    done = _cli(["run", str(recipe)], tmp_path, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert "\r" not in log
    assert "train epoch 4/4" in done.stderr and "stage 2/2: prune.magnitude" in done.stderr
    assert len(log.splitlines()) < 40, log

    quiet = _cli(["run", str(recipe), "--output", str(tmp_path / "q"), "--quiet"], tmp_path,
                 tmp_path / "cache2")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert "\r" not in quiet.stdout
    lines = quiet.stdout.strip().splitlines()
    assert any("prune.magnitude" in line for line in lines)
    assert not any(line.startswith(("note:", "report:")) for line in lines)
    assert len(lines) <= 6, quiet.stdout


# --- 3. a folder that is not a run ---------------------------------------------------------------

def test_existing_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    recipe = write_recipe(tmp_path, output=foreign)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(foreign) in err[0]
    assert "--output" in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]  # untouched
    with pytest.raises(RecipeError, match="holds no lighten run"):
        runner.run_recipe(load_recipe(recipe), progress=False, resume=True)


def test_demo_does_not_replace_a_folder_of_other_files(tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    assert main(["demo", "--output", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "--overwrite" in err
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]


def test_overwrite_or_an_empty_folder_is_accepted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_folder.check_not_foreign(empty)  # an empty folder is fine
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    recipe = load_recipe(write_recipe(tmp_path, epochs=1, output=foreign))
    result = runner.run_recipe(recipe, progress=False, overwrite=True)
    assert (foreign / "holiday.jpg").is_file() and (foreign / "run.json").is_file()
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]


def test_a_run_folder_in_use_is_refused_until_it_is_released(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, epochs=1))
    out = tmp_path / "held"
    with run_folder.run_lock(out):  # another run holds the folder
        with pytest.raises(RecipeError, match=r"in use by another lighten run \(pid \d+\)"):
            runner.run_recipe(recipe, progress=False, output=out)
        assert sorted(p.name for p in out.iterdir()) == [run_folder.LOCK_FILE]  # nothing written
    result = runner.run_recipe(recipe, progress=False, output=out)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]
    with pytest.raises(RecipeError, match="in use"), run_folder.run_lock(out):
        runner.run_recipe(recipe, progress=False, output=out, resume=True)


def test_a_run_refused_for_missing_data_leaves_no_new_folders(tmp_path, monkeypatch):
    """`lighten demo` without Fashion-MNIST: no empty runs/demo, and no empty runs/ either."""
    monkeypatch.setenv("LIGHTEN_FASHION_MNIST", str(tmp_path / "no-dataset-here"))
    path = write_recipe(tmp_path, epochs=1)
    text = path.read_text()
    path.write_text(text[:text.index("data:")] + "data: {name: fashion-mnist}\n"
                    + text[text.index("\n", text.index("data:")) + 1:])
    out = tmp_path / "runs" / "demo"
    with pytest.raises(LightenError, match="Fashion-MNIST not found"):
        runner.run_recipe(load_recipe(path), progress=False, output=out)
    assert not (tmp_path / "runs").exists()


def test_a_typo_in_the_first_steps_ignore_is_refused_before_the_baseline_trains(tmp_path):
    from lighten.errors import UnsupportedError

    path = write_recipe(tmp_path, epochs=50)  # would train for a while
    path.write_text(path.read_text().replace("finetune: {epochs: 0}",
                                             "finetune: {epochs: 0}, ignore: ['4.']"))
    with pytest.raises(UnsupportedError, match=r"steps\[0\]\.prune\.magnitude\.ignore: no "
                                               r"module named '4\.' in the model; did you mean "
                                               r"'4'\?"):
        runner.run_recipe(load_recipe(path), progress=False)
    assert not (tmp_path / "out" / "stages" / "00-baseline.safetensors").exists()


def test_a_spectral_norm_model_runs_through_export_and_reloads(tmp_path):
    """spectral_norm's power iteration does not export to ONNX: the run folds the
    parametrizations into plain weights after the baseline trains (it failed there before)."""
    path = write_recipe(tmp_path, epochs=1)
    (tmp_path / "net.py").write_text(
        "from torch import nn\nfrom torch.nn.utils.parametrizations import spectral_norm\n\n\n"
        "def build():\n    return nn.Sequential(spectral_norm(nn.Conv2d(1, 4, 3)), nn.ReLU(), "
        "nn.Flatten(), spectral_norm(nn.Linear(4 * 6 * 6, 3)))\n")
    result = runner.run_recipe(load_recipe(path), progress=False)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]
    assert any("folded into plain weights after training" in n for n in result.notes)
    from lighten.artifact import load_artifact

    for artifact in sorted((tmp_path / "out" / "stages").glob("*.safetensors")):
        model, _ = load_artifact(artifact, trust=True)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


# --- 5. measure and analyze read a python: data hook ---------------------------------------------

@pytest.mark.parametrize("prefix", ["", "python:"])
def test_measure_and_analyze_take_a_data_hook(tmp_path, capsys, prefix):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    (tmp_path / "mydata.py").write_text(DATA_FILE)
    model = f"{tmp_path / 'net.py'}:build"
    hook = f"{prefix}{tmp_path / 'mydata.py'}:make"
    assert main(["measure", model, "--input-shape", "1,8,8", "--data", hook,
                 "--latency-runs", "2", "--no-robustness", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert 0.0 <= row["accuracy"] <= 1.0 and row["params"] > 0
    out = tmp_path / "analysis"
    assert main(["analyze", model, "--input-shape", "1,8,8", "--data", hook, "--sensitivity",
                 "--ratios", "0.5", "--output", str(out)]) == 0
    assert (out / "sensitivity.csv").is_file()
