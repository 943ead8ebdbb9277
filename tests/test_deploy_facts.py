"""What a user needs to deploy a run's result (issue 10): the export self-check on real samples
at batch 1 and batch 64, the input transform and class names written everywhere, any lighten
artifact (or a state dict taken from one) accepted as weights, and run.json recording the recipe
as written next to the fully resolved settings."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import write_models_module

from lighten.artifact import load_artifact
from lighten.cli.main import main
from lighten.errors import CheckpointError
from lighten.export import CHECK_BATCH, export_onnx
from lighten.models import load_weights
from lighten.recipe import parse_recipe
from lighten.runner import run_recipe

MODELS = textwrap.dedent("""
    from torch import nn


    def build(**kw):
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


    def other(**kw):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
""")
DIGITS = {"name": "digits", "limit_train": 300, "limit_test": 96}
PRUNE = {"prune.channels": {"ratio": 0.5, "round_to": 1, "finetune": {"epochs": 1}}}
DIGIT_NAMES = [str(d) for d in range(10)]


def _recipe(tmp, models, name, *, steps, weights=None, data=None):
    model = {"python": f"{models}:build", "input_shape": [1, 8, 8]}
    if weights is not None:
        model["weights"] = str(weights)
    return {"name": name, "model": model, "data": data or DIGITS,
            "train": {"epochs": 1, "batch_size": 64}, "measure": {"robustness": False},
            "deploy": {"latency_runs": 3}, "steps": steps, "output": str(tmp / name)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small run: a trained baseline, channel pruning with a fine-tune, dynamic int8."""
    tmp = tmp_path_factory.mktemp("deploy")
    models, module = write_models_module(tmp, "deploy_models", MODELS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTEN_CACHE", str(tmp / "cache"))
        result = run_recipe(parse_recipe(_recipe(tmp, models, "r", steps=[PRUNE,
                                                                          {"quant.dynamic": {}}])),
                            progress=False)
    return tmp, models, result.output_dir, result.rows, module


def _stage(out, index):
    return sorted((out / "stages").glob(f"{index:02d}-*.safetensors"))[0]


def _onnx_props(path):
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


# ------------------------------------------------------------------ export self-check


def test_every_stage_row_reports_the_real_sample_check_at_batch_1_and_64(run):
    _, _, _, rows, _ = run
    for row in rows:
        assert row["export_inputs"] == "given samples"
        for b in (1, CHECK_BATCH):
            assert 0 <= row[f"export_max_diff_b{b}"] < 0.5
            assert row[f"export_agreement_b{b}"] >= 0.95
    # the float stages match ORT to float precision; dynamic int8 computes differently
    assert rows[0]["export_max_diff_b64"] < 1e-3


def test_export_onnx_checks_each_sample_alone_and_as_a_batch(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.randn(5, 1, 8, 8)  # fewer than 64: repeated to fill the batch
    check = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8), sample_inputs=x)
    assert set(check.by_batch) == {1, CHECK_BATCH} and check.inputs == "given samples"
    assert set(check.row()) == {"export_max_diff_b1", "export_max_diff_b64",
                                "export_agreement_b1", "export_agreement_b64", "export_inputs"}
    assert "batch 1:" in check.summary() and "batch 64:" in check.summary()
    random = export_onnx(model, tmp_path / "r.onnx", input_shape=(1, 8, 8))
    assert random.inputs.startswith("random inputs")


# ------------------------------------------------------------------ preprocessing recorded


def test_transform_and_class_names_in_manifest_onnx_run_json_and_report(run):
    _, _, out, rows, _ = run
    want = {"transform": "x = pixel / 16", "class_names": DIGIT_NAMES}
    for index, row in enumerate(rows):
        _, manifest = load_artifact(_stage(out, index))
        assert manifest["meta"]["preprocessing"] == want
        assert manifest["meta"]["data"]["name"] == "digits"
        props = _onnx_props(out / "deploy" / row["stage"] / "model.onnx")
        assert props["lighten.transform"] == "x = pixel / 16"
        assert json.loads(props["lighten.class_names"]) == DIGIT_NAMES
    info = json.loads((out / "run.json").read_text())
    assert info["preprocessing"] == want
    report = (out / "report.md").read_text()
    assert "input transform: x = pixel / 16" in report and "0, 1, 2, 3" in report


def test_lighten_export_of_a_stage_prints_preprocessing_and_both_checks(run, capsys):
    tmp, _, out, _, _ = run
    onnx_path = tmp / "stage.onnx"
    assert main(["export", str(_stage(out, 2)), "--onnx", str(onnx_path)]) == 0
    text = capsys.readouterr().out
    assert "input transform: x = pixel / 16" in text
    assert "classes: 0, 1, 2" in text
    assert "batch 1: max |diff|" in text and "batch 64: max |diff|" in text
    assert "real test samples of the run's data (digits)" in text
    props = _onnx_props(onnx_path)
    assert props["lighten.transform"] == "x = pixel / 16"


def test_python_data_records_its_transform_and_class_names(tmp_path):
    from lighten.data import DataSpec, load_data

    path, _ = write_models_module(tmp_path, "user_data", textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset


        def make():
            g = torch.Generator().manual_seed(0)
            ds = TensorDataset(torch.randn(20, 3), torch.arange(20) % 2)
            return {"train": ds, "test": ds, "transform": "x = (v - 3) / 2",
                    "class_names": ["cat", "dog"]}


        class Named(TensorDataset):
            classes = ["no", "yes"]
            transform = "x = v / 255"


        def attrs():
            ds = Named(torch.randn(20, 3), torch.arange(20) % 2)
            return ds, ds


        def plain():
            ds = TensorDataset(torch.randn(20, 3), torch.arange(20) % 2)
            return ds, ds
    """))
    made = load_data(DataSpec(python=f"{path}:make")).preprocessing()
    assert made == {"transform": "x = (v - 3) / 2", "class_names": ["cat", "dog"]}
    named = load_data(DataSpec(python=f"{path}:attrs")).preprocessing()
    assert named == {"transform": "x = v / 255", "class_names": ["no", "yes"]}
    plain = load_data(DataSpec(python=f"{path}:plain")).preprocessing()
    assert plain["transform"].startswith("not described") and plain["class_names"] is None


def test_fashion_mnist_names_its_ten_classes():
    from lighten.data import fashion_mnist as fm

    assert len(fm.CLASS_NAMES) == 10 and fm.CLASS_NAMES[9] == "Ankle boot"


# ------------------------------------------------------------------ artifacts as weights


def test_cli_weights_accepts_a_pruned_stage_and_a_state_dict_taken_from_it(run, capsys):
    tmp, models, out, rows, _ = run
    pruned = _stage(out, 1)
    stage_model, _ = load_artifact(pruned)
    pt, st = tmp / "pruned_state.pt", tmp / "pruned_state.safetensors"
    torch.save(stage_model.state_dict(), pt)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in stage_model.state_dict().items()}, str(st))
    for weights in (pruned, pt, st):
        argv = ["measure", f"{models}:build", "--input-shape", "1,8,8", "--weights",
                str(weights), "--data", "digits", "--no-robustness", "--latency-runs", "3",
                "--limit", "96", "--json"]
        assert main(argv) == 0, capsys.readouterr().err
        row = json.loads(capsys.readouterr().out)
        assert row["params"] == rows[1]["params"] and row["accuracy"] == rows[1]["accuracy"]
    argv = ["export", f"{models}:build", "--input-shape", "1,8,8", "--weights", str(pruned),
            "--onnx", str(tmp / "w.onnx")]
    assert main(argv) == 0
    assert "input transform: x = pixel / 16" in capsys.readouterr().out  # from the artifact


def test_load_weights_takes_a_quantized_stage_as_its_model(run):
    _, _, out, _, _ = run
    module = run[4]
    model = load_weights(module.build(), _stage(out, 2))
    assert any(type(m).__name__.startswith("DynamicQuant") for m in model.modules())
    loaded, _ = load_artifact(_stage(out, 2))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_an_artifact_of_another_architecture_is_one_clear_error(run):
    _, _, out, _, _ = run
    module = run[4]
    with pytest.raises(CheckpointError, match="use the artifact itself as the model"):
        load_weights(module.other(), _stage(out, 1))


def test_recipe_weights_accepts_a_stage_and_a_state_dict_taken_from_it(run, monkeypatch):
    tmp, models, out, rows, _ = run
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp / "cache"))
    stage_model, _ = load_artifact(_stage(out, 1))
    pt = tmp / "recipe_state.pt"
    torch.save(stage_model.state_dict(), pt)
    for i, weights in enumerate((_stage(out, 1), pt)):
        result = run_recipe(parse_recipe(_recipe(tmp, models, f"w{i}", steps=[],
                                                 weights=weights)), progress=False)
        base = result.rows[0]
        assert base["params"] == rows[1]["params"] and base["accuracy"] == rows[1]["accuracy"]
        assert f"baseline: weights {weights}" in result.notes


# ------------------------------------------------------------------ recipe as written


def test_run_json_keeps_the_recipe_as_written_and_the_resolved_settings(run):
    _, _, out, _, _ = run
    info = json.loads((out / "run.json").read_text())
    assert info["recipe"]["steps"][0] == PRUNE  # finetune: {epochs: 1} as written
    assert "train" in info["recipe"] and "seed" not in info["recipe"]  # nothing filled in
    settings = info["settings"]
    step = settings["steps"][0]["prune.channels"]
    assert step["finetune"]["epochs"] == 1 and "importance" in step  # every default
    assert settings["seed"] == 0 and settings["train"]["optimizer"] == "adam"
    data = settings["data"]
    assert data["name"] == "digits" and data["limit_train"] == 300
    for key in ("samples", "input_shape", "num_classes", "tokenizer", "seq_len", "root"):
        assert key not in data
    report = (out / "report.md").read_text()
    assert "Resolved settings" in report and "epochs: 1" in report


def test_synthetic_settings_keep_the_synthetic_knobs():
    recipe = parse_recipe({"name": "s", "model": {"zoo": "lenet5"},
                           "data": {"name": "synthetic", "samples": 64}})
    data = recipe.settings()["data"]
    assert data["samples"] == 64 and data["input_shape"] == [1, 28, 28]
    assert "tokenizer" not in data and "root" not in data
    assert recipe.as_written()["data"] == {"name": "synthetic", "samples": 64}
