"""dynamic.any_precision: the b-bit weights are the top bits of the stored int8 codes, one
artifact serves every precision (each equal to its own plain sub-model, in PyTorch and ONNX
Runtime), reloads, exports per precision, runs from a recipe, and refuses bad input clearly."""

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from torch import nn

import lighten
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.dynamic.any_precision import AnyPrecisionConfig, AnyPrecisionModel, select_precision
from lighten.dynamic.any_precision_layers import NestedQuantConv, NestedQuantLinear
from lighten.errors import LightenError, ModelError, RecipeError, UnsupportedError
from lighten.export import export_onnx
from lighten.models import ModelSpec, build_model
from lighten.training import TrainConfig, evaluate, train

TRAIN = TrainConfig(epochs=1, lr=0.01, batch_size=64)

NET = '''
import torch
from torch import nn


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.res = Res(16)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(self.res(self.stem(x)), 2).flatten(1))


def build():
    return Net()
'''


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("anyp")
    (root / "net.py").write_text(NET)
    spec = {"python": f"{root / 'net.py'}:build", "input_shape": [1, 8, 8]}
    torch.manual_seed(0)
    model = build_model(ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10)
    train(model, digits.train, TrainConfig(epochs=2, lr=0.01, batch_size=64), progress=False)
    ap, report = lighten.compress(model, AnyPrecisionConfig(finetune={"epochs": 0.5}),
                                  data=digits, train=TRAIN)
    path = root / "ap.safetensors"
    save_artifact(ap, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10,
                  task=digits.task)
    return ap.eval(), report, path


def _x(n=16):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_lower_precisions_are_the_top_bits_of_the_stored_codes(trained):
    ap, report, _ = trained
    layers = ap.nested_layers()
    assert len(layers) == 3 and ap.precisions == [8, 4, 2]
    for layer in layers.values():
        raw = layer.codes.view(torch.uint8).to(torch.int64)  # the stored bytes
        for i, b in enumerate(ap.bits):
            top = raw >> (8 - b)  # the b most significant bits, as an unsigned field
            signed = torch.where(top >= 2 ** (b - 1), top - 2 ** b, top)  # two's complement
            assert torch.equal(layer.codes_at(b).to(torch.int64), signed)
            assert layer.codes_at(b).min() >= -(2 ** (b - 1))
            assert layer.codes_at(b).max() <= 2 ** (b - 1) - 1
            expected = (signed.float() + 0.5) * layer.scales[i].reshape(-1, *[1] * (
                raw.dim() - 1))
            assert torch.equal(layer.weight_at(b), expected)
        plain = layer.to_float(2)
        assert torch.equal(plain.weight.data, layer.weight_at(2))
    sqnr = report.summary["dynamic"]["weight_sqnr_db"]
    assert sqnr["8"] > sqnr["4"] > sqnr["2"] > 0  # more bits, closer to the float weights


def test_every_precision_is_its_own_sub_model_and_they_differ(trained, digits):
    ap, _, _ = trained
    x = _x()
    outs = {}
    with torch.no_grad():
        for b in ap.bits:
            outs[b] = ap.set_precision(b)(x)
            assert torch.allclose(outs[b], ap.plain(b)(x), atol=1e-5)
    ap.set_precision(8)
    assert not torch.allclose(outs[8], outs[2], atol=1e-3)
    acc = {b: evaluate(ap.set_precision(b), digits.test, progress=False) for b in ap.bits}
    ap.set_precision(8)
    assert acc[8] > 0.6 and acc[4] > 0.5  # trained, not noise (10 classes)


def test_one_artifact_stores_one_code_tensor_per_layer_and_serves_each_precision(trained):
    ap, _, path = trained
    _, manifest = load_artifact(path, trust=True)
    entries = manifest["tensors"]  # per state_dict entry, however it is stored on disk
    for name, layer in ap.nested_layers().items():
        own = sorted(k.rsplit(".", 1)[1] for k in entries if k.rsplit(".", 1)[0] ==
                     f"backbone.{name}")
        assert own == sorted(["codes", "scales", *(["bias"] if layer.bias is not None else [])])
        assert entries[f"backbone.{name}.codes"]["dtype"] in ("int8", "torch.int8")
        assert entries[f"backbone.{name}.scales"]["shape"] == [3, layer.codes.shape[0]]
    with safe_open(str(path), framework="pt") as f:  # large code tensors: plain int8 entries
        assert f.get_tensor("backbone.fc.codes").dtype == torch.int8
    x = _x()
    for b in ap.bits:
        loaded, manifest = load_artifact(path, bits=b, trust=True)
        assert isinstance(loaded, AnyPrecisionModel) and loaded.active == b
        assert manifest["model_spec"]["python"].endswith("net.py:build")
        with torch.no_grad():
            assert torch.allclose(loaded(x), ap.plain(b)(x), atol=1e-5)
    default, _ = load_artifact(path, trust=True)  # saved at its widest precision
    assert default.active == 8


def test_each_precision_exports_to_a_plain_onnx_model(trained, tmp_path):
    ap, _, _ = trained
    x = _x()
    for b in (4, 2):
        loaded = ap.set_precision(b)
        check = export_onnx(loaded, tmp_path / f"w{b}.onnx", input_shape=(1, 8, 8))
        proto = onnx.load(str(check.path))
        assert {i.data_type for i in proto.graph.initializer} <= {onnx.TensorProto.FLOAT,
                                                                  onnx.TensorProto.INT64}
        session = ort.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = ap.plain(b)(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(got - ref).max() < 1e-4
    ap.set_precision(8)


def test_cli_export_picks_the_precision(trained, tmp_path, capsys):
    from lighten.cli.main import main

    ap, _, path = trained
    out = tmp_path / "w4.onnx"
    assert main(["export", str(path), "--trust", "--bits", "4", "--onnx", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _x()
    with torch.no_grad():
        ref = ap.plain(4)(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4
    bad = ["export", str(path), "--trust", "--bits", "3", "--onnx", str(tmp_path / "x.onnx")]
    assert main(bad) != 0
    assert "not one of this model's trained precisions [8, 4, 2]" in capsys.readouterr().err


def test_bad_input_is_one_clear_error(trained, digits):
    ap, _, path = trained
    with pytest.raises(UnsupportedError, match=r"bits=3 is not one of .* \[8, 4, 2\]"):
        ap.set_precision(3)
    with pytest.raises(UnsupportedError, match="stored as 8-bit codes at most"):
        load_artifact(path, bits=16, trust=True)
    with pytest.raises(ModelError, match="dynamic.any_precision"):
        select_precision(nn.Linear(2, 2), 4)
    with pytest.raises(RecipeError, match="each width must be 1..8"):
        lighten.compress(nn.Linear(64, 10), {"dynamic.any_precision": {"bits": [16, 4]}},
                         data=digits)
    with pytest.raises(RecipeError, match="twice"):
        lighten.compress(nn.Linear(64, 10), {"dynamic.any_precision": {"bits": [8, 8]}},
                         data=digits)
    with pytest.raises(UnsupportedError, match="no Conv1d/2d/3d"):
        lighten.compress(nn.Sequential(nn.Flatten(), nn.ReLU()), AnyPrecisionConfig(
            finetune={"epochs": 0}), data=digits)
    with pytest.raises(LightenError, match="cannot run on a quantized model"):
        lighten.compress(ap, {"prune.magnitude": {"sparsity": 0.5}}, data=digits)


def test_nested_layers_build_from_their_artifact_config():
    lin = NestedQuantLinear(4, 3, bits=[8, 2], bias=False)
    conv = NestedQuantConv(2, 4, [3, 3], bits=[6, 3, 1], padding=[1, 1], groups=2)
    for layer in (lin, conv):
        again = type(layer).from_artifact(json.loads(json.dumps(layer.artifact_config())))
        assert again.artifact_config() == layer.artifact_config()
    assert conv.codes.shape == (4, 1, 3, 3) and conv.scales.shape == (3, 4)


def test_recipe_on_a_zoo_model_reports_every_precision(tmp_path):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: anyp
        model: {{zoo: lenet5}}
        data: {{name: digits, limit_train: 600, limit_test: 120}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - dynamic.any_precision: {{bits: [8, 4, 2], finetune: {{epochs: 0.5}}}}
    """))
    base, row = run_recipe(load_recipe(recipe), progress=False).rows
    dyn = row["dynamic"]
    assert dyn["kind"] == "any_precision" and [p["bits"] for p in dyn["precisions"]] == [8, 4, 2]
    assert dyn["precisions"][0]["accuracy"] == pytest.approx(row["accuracy"])
    assert dyn["precisions"][0]["agreement_with_widest"] == 1.0
    assert dyn["precisions"][2]["weight_bytes"] < dyn["precisions"][0]["weight_bytes"]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["dynamic"]["precisions"] == dyn["precisions"]
    model, manifest = load_artifact(out / "stages" / "01-dynamic.any_precision.safetensors",
                                    bits=2)
    assert manifest["model_spec"] == {"zoo": "lenet5"} or manifest["model_spec"]["zoo"]
    assert isinstance(model, AnyPrecisionModel) and model.active == 2


def test_report_has_a_precision_table():
    from lighten.report import _dynamic_sections

    row = {"stage": "dynamic.any_precision", "dynamic": {
        "kind": "any_precision", "active_bits": 8, "stored_bits": 8, "precisions": [
            {"bits": 8, "accuracy": 0.9, "agreement_with_widest": 1.0, "weight_bytes": 2048},
            {"bits": 4, "accuracy": 0.88, "agreement_with_widest": 0.97, "weight_bytes": 1024}]}}
    (title, (kind, header, body)), = _dynamic_sections([row])
    assert title == "Precisions: dynamic.any_precision" and kind == "table"
    assert [r[0] for r in body] == ["8-bit (active)", "4-bit"]
    assert body[1][1].startswith("88") and header[2] == "agreement with the widest"
