"""The ``distill`` step with teachers and students outside the zoo: the trained student is the
stage, saved without adapters or exit heads, reloaded from its own source, exported to ONNX;
``finetune:`` distillation from any teacher; the step from a recipe through ``lighten run``."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lighten import compress
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.errors import RecipeError
from lighten.training import TrainConfig

MODELS = '''
import torch
from torch import nn


class Teacher(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class Student(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.head = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.flatten(1))


def teacher(width=16):
    return Teacher(width)


def student(classes=10):
    return Student(classes)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """digits, a python: teacher trained briefly and saved as weights, the models module."""
    from conftest import write_models_module

    root = tmp_path_factory.mktemp("distill")
    path, module = write_models_module(root, "kd_models", MODELS)
    data = load_data(DataSpec(name="digits", limit_train=600, limit_test=200))
    torch.manual_seed(0)
    teacher = module.teacher()
    from lighten.training import train

    train(teacher, data.train, TrainConfig(epochs=2, lr=3e-3, batch_size=32), progress=False)
    weights = root / "teacher.safetensors"
    save_file(teacher.state_dict(), str(weights))
    return {"root": root, "path": path, "module": module, "data": data,
            "teacher": teacher.eval(), "weights": weights}


def _roundtrip(model, spec, data, tmp_path):
    """Save with the step's source spec, reload from it alone, compare; export to ONNX."""
    from lighten.export import export_onnx

    path = tmp_path / "student.safetensors"
    save_artifact(model, path, model_spec=spec, input_shape=list(data.input_shape),
                  num_classes=10, task=data.task)
    loaded, manifest = load_artifact(path, trust=True)
    x = torch.stack([data.test[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), loaded(x), atol=1e-5)
    check = export_onnx(loaded, tmp_path / "student.onnx", input_shape=(1, 8, 8), sample_inputs=x)
    assert check.agreement >= 0.99
    return loaded, manifest


def test_python_teacher_to_python_student_saves_reloads_and_exports(setup, tmp_path):
    data = setup["data"]
    cfg = {"distill": {"method": "dkd",
                       "teacher": {"python": f"{setup['path']}:teacher",
                                   "weights": str(setup["weights"])},
                       "student": {"python": f"{setup['path']}:student"},
                       "finetune": {"epochs": 1, "lr": 3e-3}}}
    model, report = compress(setup["module"].student(), cfg, data=data, seed=0,
                             train=TrainConfig(batch_size=32))
    assert type(model).__name__ == "Student"
    spec = report.summary["source_spec"]
    assert spec["python"].endswith(":student") and spec["input_shape"] == [1, 8, 8]
    assert "teacher logits cached" in " ".join(report.notes)
    _, manifest = _roundtrip(model, spec, data, tmp_path)
    assert manifest["edits"] == []  # the student is its own source, unchanged


@pytest.mark.parametrize("method", ["hint", "attention", "relational"])
def test_feature_methods_leave_no_adapter_or_hook_in_the_student(method, setup, tmp_path):
    data = setup["data"]
    student = setup["module"].student()
    keys = set(student.state_dict())
    model, report = compress(student, {"distill": {"method": method, "finetune": {
        "epochs": 0.5, "lr": 3e-3}}}, data=data, baseline=setup["teacher"], seed=0,
        train=TrainConfig(batch_size=32))
    assert set(model.state_dict()) == keys
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(p.requires_grad is False for p in model.parameters())
    if method == "hint":  # 4-wide student map -> 16-wide teacher map: a learned adapter
        rows = [r for r in report.layers if r["action"] == "match"]
        assert rows and rows[0]["after"] == "Sequential"
    x = torch.stack([data.test[i][0] for i in range(4)])
    with torch.no_grad():
        assert model(x).shape == (4, 10)


def test_student_derived_from_teacher_by_width_rebuilds_from_teacher_source(setup, tmp_path):
    data = setup["data"]
    teacher_ref = {"python": f"{setup['path']}:teacher", "weights": str(setup["weights"])}
    model, report = compress(setup["module"].student(), {"distill": {
        "teacher": teacher_ref, "student": {"width": 0.5},
        "finetune": {"epochs": 0.5, "lr": 3e-3}}}, data=data, seed=0,
        train=TrainConfig(batch_size=32))
    assert type(model).__name__ == "Teacher"
    assert model.features[0].out_channels == 8 and model.fc.in_features == 16
    spec = report.summary["source_spec"]
    assert spec["python"].endswith(":teacher")
    _, manifest = _roundtrip(model, spec, data, tmp_path)
    assert any(e["op"] in ("module", "tensor") for e in manifest["edits"])


def test_self_distillation_heads_only_when_asked(setup, tmp_path):
    from lighten.distill.heads import ExitHeads

    data = setup["data"]
    base = setup["module"].teacher()
    plain, report = compress(base, {"distill": {"method": "self", "finetune": {
        "epochs": 0.5, "lr": 3e-3}}}, data=data, seed=0, train=TrainConfig(batch_size=32))
    assert not hasattr(plain, "exit_heads")
    assert set(plain.state_dict()) == set(base.state_dict())
    assert [r["module"] for r in report.layers if r["action"] == "exit head"] == ["features.5"]
    kept, _ = compress(base, {"distill": {"method": "self", "keep_heads": True, "finetune": {
        "epochs": 0.5, "lr": 3e-3}}}, data=data, seed=0, train=TrainConfig(batch_size=32))
    assert isinstance(kept.exit_heads, ExitHeads) and kept.exit_heads.layers == ["features.5"]
    loaded, _ = _roundtrip(kept, {"python": f"{setup['path']}:teacher",
                                  "input_shape": [1, 8, 8]}, data, tmp_path)
    assert isinstance(loaded.exit_heads, ExitHeads)
    assert torch.equal(loaded.exit_heads.heads[0][-1].weight, kept.exit_heads.heads[0][-1].weight)
    # a later step that resizes the layer a head reads drops the head, saying so: the saved
    # model never carries a head that cannot run
    narrowed = kept.exit_heads.shapes[0][0]
    pruned, report = compress(kept, {"prune.channels": {"ratio": 0.5}}, data=data, seed=0)
    assert not hasattr(pruned, "exit_heads")
    assert any("exit heads dropped" in n and "features.5" in n for n in report.notes)
    assert narrowed == 16 and pruned.features[3].out_channels < 16
    _roundtrip(pruned, {"python": f"{setup['path']}:teacher", "input_shape": [1, 8, 8]}, data,
               tmp_path)


def test_finetune_distills_from_any_teacher_with_any_loss(setup):
    data = setup["data"]
    teacher = {"python": f"{setup['path']}:teacher", "weights": str(setup["weights"])}
    model, report = compress(setup["module"].teacher(), {"prune.magnitude": {
        "sparsity": 0.5, "finetune": {"epochs": 0.5, "teacher": teacher, "loss": "dkd"}}},
        data=data, seed=0, train=TrainConfig(batch_size=32))
    weights = [p for p in model.parameters() if p.dim() >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.02)  # the distilling fine-tune kept the zeros
    with pytest.raises(RecipeError, match="unknown distillation loss"):
        compress(model, {"prune.magnitude": {"sparsity": 0.5, "finetune": {"loss": "dkdd"}}},
                 data=data)
    with pytest.raises(RecipeError, match="teacher"):
        compress(model, {"prune.magnitude": {"sparsity": 0.5, "finetune": {"teacher": "bad"}}},
                 data=data)


def test_distill_step_from_a_recipe_saves_the_student_as_the_stage(setup, tmp_path, monkeypatch):
    import onnxruntime as ort

    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "kd_models.py").write_text(MODELS)
    (tmp_path / "teacher.safetensors").write_bytes(setup["weights"].read_bytes())
    out = tmp_path / "run"
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: kd
        model: {{python: kd_models.py:teacher, input_shape: [1, 8, 8],
                 weights: teacher.safetensors}}
        data: {{name: digits, limit_train: 400, limit_test: 100}}
        train: {{epochs: 1, lr: 0.003, batch_size: 32}}
        measure: {{robustness: false}}
        deploy: {{latency_runs: 3}}
        output: {out}
        steps:
          - distill: {{method: hinton, teacher: baseline,
                       student: {{python: kd_models.py:student}},
                       finetune: {{epochs: 4, lr: 0.01}}}}
          - prune.magnitude: {{sparsity: 0.5, finetune: {{epochs: 0.5, distill: 0.5}}}}
    """))
    result = run_recipe(load_recipe(recipe), progress=False)
    base, student, pruned = result.rows
    assert student["params"] < base["params"] and student["accuracy"] > 0.3
    model, manifest = load_artifact(out / "stages" / "01-distill.safetensors", trust=True)
    assert type(model).__name__ == "Student"
    assert manifest["model_spec"]["python"].endswith("kd_models.py:student")
    later, manifest2 = load_artifact(out / "stages" / "02-prune.magnitude.safetensors", trust=True)
    assert manifest2["model_spec"] == manifest["model_spec"]  # later stages build the student
    x = torch.stack([torch.as_tensor(load_data(DataSpec(name="digits")).test[i][0])
                     for i in range(16)])
    session = ort.InferenceSession(str(out / "deploy" / "distill" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - ref).max() < 1e-3
