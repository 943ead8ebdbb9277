"""--resume after a recipe change: appended steps just run, a changed finished step is named,
a new name or output: is no change, a finished run is left untouched, and a run resumed on
another CPU keeps its target."""

from __future__ import annotations

import json

import pytest
import torch

from lighten import runner
from lighten.errors import RecipeError
from lighten.recipe import load_recipe
from tests.test_runner import read_rows, write_recipe

ONE_STEP = """
  - prune.magnitude: {sparsity: 0.5}
"""
TWO_STEPS = ONE_STEP + """
  - quant.dynamic: {}
"""


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, steps, **kw):
    return runner.run_recipe(load_recipe(write_recipe(tmp_path, steps=steps)), progress=False,
                             **kw)


def test_appending_a_step_to_a_finished_run_runs_only_the_new_step(tmp_path):
    _run(tmp_path, ONE_STEP)
    out = tmp_path / "out"
    first = (out / "stages" / "01-prune.magnitude.safetensors").read_bytes()
    result = _run(tmp_path, TWO_STEPS, resume=True)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude", "quant.dynamic"]
    assert (out / "stages" / "01-prune.magnitude.safetensors").read_bytes() == first
    assert json.loads((out / "state.json").read_text())["recipe"]["steps"][1] == {
        "quant.dynamic": {}}


def test_a_changed_finished_step_is_refused_naming_what_changed(tmp_path):
    _run(tmp_path, ONE_STEP)
    with pytest.raises(RecipeError, match=r"steps\[0\]\.prune\.magnitude\.sparsity: 0\.5 -> 0\.6"):
        _run(tmp_path, "\n  - prune.magnitude: {sparsity: 0.6}\n", resume=True)
    with pytest.raises(RecipeError, match=r"train\.epochs: 3\.0 -> 2\.0"):
        path = write_recipe(tmp_path, steps=ONE_STEP)
        path.write_text(path.read_text().replace("epochs: 3", "epochs: 2"))
        runner.run_recipe(load_recipe(path), resume=True, progress=False)


def test_a_renamed_or_moved_recipe_resumes_the_run_given_by_output(tmp_path):
    _run(tmp_path, ONE_STEP)
    path = write_recipe(tmp_path, steps=TWO_STEPS)
    path.write_text(path.read_text().replace("name: e2e", "name: renamed").replace(
        f"output: {tmp_path / 'out'}", f"output: {tmp_path / 'elsewhere'}"))
    result = runner.run_recipe(load_recipe(path), resume=True, progress=False,
                               output=tmp_path / "out")
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude", "quant.dynamic"]


def test_resuming_a_finished_run_rewrites_nothing(tmp_path):
    _run(tmp_path, ONE_STEP)
    out = tmp_path / "out"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = _run(tmp_path, ONE_STEP, resume=True)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_run_killed_after_its_last_stage_is_finished_by_resume(tmp_path):
    """Killed while timing the stages or writing the report: every stage is done, but the
    report is missing and a write was cut short. --resume times and reports, trains nothing."""
    _run(tmp_path, ONE_STEP)
    out = tmp_path / "out"
    artifact = out / "stages" / "01-prune.magnitude.safetensors"
    trained = artifact.read_bytes()
    (out / "report.md").unlink()
    checksums = json.loads((out / "checksums.json").read_text())
    (out / "checksums.json").write_text(json.dumps({**checksums, "finished": False}))
    stray = out / "deploy" / "prune.magnitude" / ".model.onnx.x1y2z3.tmp"
    stray.write_bytes(b"half an onnx file")
    result = _run(tmp_path, ONE_STEP, resume=True)
    assert [r["stage"] for r in result.rows] == ["baseline", "prune.magnitude"]
    assert all(r.get("latency_ms_b1") for r in result.rows)
    assert (out / "report.md").is_file() and not stray.exists()
    assert artifact.read_bytes() == trained
    assert json.loads((out / "checksums.json").read_text())["finished"] is True


def test_a_run_finished_before_the_finished_mark_still_counts_as_finished(tmp_path):
    from lighten.verify import run_finished

    _run(tmp_path, ONE_STEP)
    out = tmp_path / "out"
    record = json.loads((out / "checksums.json").read_text())
    del record["finished"]  # as an earlier lighten wrote it
    (out / "checksums.json").write_text(json.dumps(record))
    assert run_finished(out)
    (out / "report.md").unlink()
    assert not run_finished(out)


def test_a_run_resumed_on_another_cpu_keeps_building_for_its_recorded_cpu(tmp_path):
    _run(tmp_path, ONE_STEP)
    out = tmp_path / "out"
    state = json.loads((out / "state.json").read_text())
    other = "avx2" if state["target"]["cpu"] != "avx2" else "avx512"
    state["target"]["cpu"] = other  # as if the run had started on another machine
    (out / "state.json").write_text(json.dumps(state))
    _run(tmp_path, TWO_STEPS, resume=True)
    state = json.loads((out / "state.json").read_text())
    assert state["target"]["cpu"] == other
    assert any("resumed on a" in n and other in n for n in state["notes"])
    assert read_rows(out)[-1]["stage"] == "quant.dynamic"


def test_a_stage_that_loses_much_accuracy_is_noted_with_what_helps(tmp_path):
    from types import SimpleNamespace

    from lighten.recipe import parse_step
    from lighten.runner import drop_note
    from lighten.task import ClassificationTask, LanguageModelTask

    task = ClassificationTask((1, 8, 8), 4)
    entry = {"prune.magnitude": {"sparsity": 0.9, "finetune": {"epochs": 0}}}
    step = SimpleNamespace(name="prune.magnitude", config=parse_step(entry, where="t").config)
    note = drop_note({"accuracy": 0.9}, {"accuracy": 0.3}, step, task)
    assert note == ("prune.magnitude: accuracy fell 60.0 points (90.00% -> 30.00%); give the "
                    "step finetune: {epochs: 2} to recover, or a gentler setting")
    assert drop_note({"accuracy": 0.9}, {"accuracy": 0.87}, step, task) is None
    lm = LanguageModelTask(16, 8)
    assert "perplexity fell from 10 to 12" in drop_note({"perplexity": 10.0},
                                                        {"perplexity": 12.0}, step, lm)
    assert drop_note({"perplexity": 10.0}, {"perplexity": 10.5}, step, lm) is None
    assert drop_note({"accuracy": 0.0}, {"accuracy": 0.0}, step, task) is None
    assert drop_note({"perplexity": 0.0}, {"perplexity": 0.0}, step, lm) is None
    # the runner notes it: a layer's every weight but one zeroed, nothing fine-tuned
    result = _run(tmp_path, "\n  - prune.magnitude: {sparsity: 0.999, finetune: {epochs: 0}}\n")
    base, pruned = (r["accuracy"] for r in result.rows)
    assert base - pruned >= 0.05
    assert any(n.startswith("prune.magnitude: accuracy fell") for n in result.notes)


def test_a_batchnorm_called_twice_per_forward_is_named():
    from torch import nn

    from lighten.runner import shared_norm_notes

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.b(self.bn(self.a(x))))

    notes = shared_norm_notes(Reuse(), (torch.randn(2, 4),))
    assert len(notes) == 1 and notes[0].startswith("bn (2 calls per forward): one BatchNorm")
    assert shared_norm_notes(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
                             (torch.randn(2, 4),)) == []
