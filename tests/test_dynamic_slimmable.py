"""dynamic.slimmable: every width of one artifact exports to a plain ONNX model that computes
its sub-model's outputs, MACs shrink about as w^2, residual channels are sliced together,
artifacts reload, the runner records the per-width breakdown, bad input is one clear error."""

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _models import RESIDUAL_BLOCK, model_source
from torch import nn

import lighten
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.dynamic.slimmable import SlimmableConfig, SlimmableModel, width_facts
from lighten.dynamic.slimmable_layers import SlimConv, SwitchableBatchNorm
from lighten.dynamic.slimmable_runtime import export_width, pick_width
from lighten.errors import LightenError, UnsupportedError
from lighten.models import ModelSpec, build_model
from lighten.training import TrainConfig

NET = model_source(RESIDUAL_BLOCK, '''
class Net(nn.Module):
    """A residual block, a depthwise conv, then flatten -> hidden Linear -> classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = Block(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.dw(self.block(self.stem(x))))
        x = nn.functional.max_pool2d(x, 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


def build():
    return Net()
''')

WIDTHS = [1.0, 0.75, 0.5, 0.25]


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec(name="digits", limit_train=512, limit_test=64))


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("slim") / "net.py"
    path.write_text(NET)
    return {"python": f"{path}:build", "input_shape": [1, 8, 8]}


@pytest.fixture(scope="module")
def slim(spec, data):
    torch.manual_seed(0)
    model = build_model(ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10)
    sm, report = lighten.compress(model, SlimmableConfig(widths=WIDTHS,
                                                         finetune={"epochs": 1}),
                                  data=data, train=TrainConfig(epochs=1, lr=0.01, batch_size=64))
    sm.backbone_spec = spec  # compress has no recipe to read it from
    return model.eval(), sm.eval(), report


def _x(data, n=16):
    return torch.stack([data.test[i][0] for i in range(n)])


def test_each_width_exports_a_plain_model_equal_to_its_sub_model(slim, data, tmp_path):
    _, sm, _ = slim
    x = _x(data)
    for w in WIDTHS:
        path = tmp_path / f"w{w}.onnx"
        export_width(sm, w, path, sample_inputs=(x,))
        graph = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        deployed = graph.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            own = sm.set_width(w)(x).numpy()
        assert np.abs(deployed - own).max() <= 1e-5 * max(1.0, float(np.abs(own).max()))
        plain = sm.at_width(w)
        assert not any(isinstance(m, (SlimConv, SwitchableBatchNorm)) for m in plain.modules())
        # the file holds that width's weights only
        convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
        assert convs[1].out_channels == max(1, int(np.ceil(16 * w)))
    sm.set_width(1.0)


def test_widths_share_weights_and_width_one_is_the_model(slim, data):
    base, sm, _ = slim
    x = _x(data)
    wide, narrow = sm.at_width(1.0), sm.at_width(0.5)
    assert torch.equal(narrow.stem[0].weight, wide.stem[0].weight[:8])
    # switchable BN: each width has its own statistics (after a sliced input: other values)
    bn = sm.backbone.block.bn1
    assert isinstance(bn, SwitchableBatchNorm)
    assert [b.num_features for b in bn.bns] == [16, 12, 8, 4]
    assert not torch.allclose(bn.bns[2].running_mean, bn.bns[0].running_mean[:8])
    with torch.no_grad():
        assert sm.set_width(1.0)(x).shape == base(x).shape


def test_residual_channels_are_sliced_together_and_macs_shrink_like_w_squared(slim, data):
    _, sm, report = slim
    for w in WIDTHS[1:]:
        plain = sm.at_width(w)
        k = max(1, int(np.ceil(16 * w)))
        # the stem, the block's second conv and the depthwise conv share the residual channels
        assert plain.stem[0].out_channels == plain.block.conv2.out_channels == k
        assert plain.dw.groups == plain.dw.out_channels == k
        assert plain.fc.in_features == k * 16 and plain.head.out_features == 10
    facts = width_facts(sm, _x(data, 1))
    full = facts[0]["macs"]
    for f in facts:
        ratio = f["macs"] / full
        assert 0.8 * f["width"] ** 2 <= ratio <= 1.3 * f["width"] ** 2 + 0.02, (f, ratio)
    assert [f["macs"] for f in report.summary["dynamic"]["widths"]] == [f["macs"] for f in facts]


def test_artifact_holds_every_width_and_reloads(slim, data, tmp_path, spec):
    _, sm, _ = slim
    x = _x(data)
    sm.set_width(0.5)
    path = tmp_path / "slim.safetensors"
    save_artifact(sm, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)
    loaded, _ = load_artifact(path, trust=True)  # the model file is the test's own
    assert isinstance(loaded, SlimmableModel) and loaded.width == 0.5
    loaded.eval()
    with torch.no_grad():
        for w in WIDTHS:
            assert torch.allclose(loaded.set_width(w)(x), sm.set_width(w)(x), atol=1e-6)
    sm.set_width(1.0)


def test_cli_export_width(slim, tmp_path, spec, capsys):
    from lighten.cli import main

    _, sm, _ = slim
    sm.set_width(1.0)
    path = tmp_path / "slim.safetensors"
    save_artifact(sm, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)
    onnx_path = tmp_path / "w25.onnx"
    assert main(["export", str(path), "--onnx", str(onnx_path), "--width", "0.25",
                 "--trust"]) == 0
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - sm.set_width(0.25)(x).numpy()).max() <= 1e-5
    sm.set_width(1.0)
    assert main(["export", str(path), "--onnx", str(tmp_path / "x.onnx"), "--width", "0.6",
                 "--trust"]) != 0
    assert "not one this model was trained for" in capsys.readouterr().err


def test_pick_width_takes_the_widest_within_the_budget(slim):
    _, sm, _ = slim
    width, timing = pick_width(sm, 1e6, count=20, rounds=2)
    assert width == 1.0 and set(timing) == set(WIDTHS)
    with pytest.raises(UnsupportedError, match="no width meets"):
        pick_width(sm, 1e-9, count=20, rounds=2)


def test_recipe_records_the_per_width_breakdown(spec, tmp_path):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    (tmp_path / "net.py").write_text(NET)
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: slimmable
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {{name: digits, limit_train: 256, limit_test: 64}}
        train: {{epochs: 1, lr: 0.01, batch_size: 64}}
        measure: {{robustness: false}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - dynamic.slimmable: {{widths: [1.0, 0.5], width: 0.5, finetune: {{epochs: 0.5}}}}
    """))
    base, row = run_recipe(load_recipe(recipe), progress=False).rows
    dyn = row["dynamic"]
    assert dyn["kind"] == "slimmable" and dyn["width"] == 0.5
    assert [w["width"] for w in dyn["widths"]] == [1.0, 0.5]
    assert all(w["accuracy"] is not None and w["latency_ms_b1"] > 0 for w in dyn["widths"])
    assert row["macs"] == dyn["widths"][1]["macs"] < base["macs"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["dynamic"]["widths"][1]["width"] == 0.5
    assert "Slimmable widths: dynamic.slimmable" in (out / "report.md").read_text()


def test_bad_input_is_one_clear_error(slim, data):
    from lighten.recipe import parse_step

    _, sm, _ = slim
    with pytest.raises(LightenError, match="include 1.0"):
        parse_step({"dynamic.slimmable": {"widths": [0.5, 0.25]}}, where="r")
    with pytest.raises(LightenError, match=r"lie in \(0, 1\]"):
        parse_step({"dynamic.slimmable": {"widths": [1.0, 1.5]}}, where="r")
    with pytest.raises(LightenError, match="width 0.3 is not among widths"):
        parse_step({"dynamic.slimmable": {"width": 0.3}}, where="r")
    with pytest.raises(UnsupportedError, match="apply the step once"):
        lighten.compress(sm, SlimmableConfig(finetune={"epochs": 0}), data=data)
    with pytest.raises(UnsupportedError, match="not one this model was trained for"):
        sm.at_width(0.6)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # its only channels are the output
    with pytest.raises(UnsupportedError, match="no channel group of the model can be slimmed"):
        lighten.compress(flat, SlimmableConfig(finetune={"epochs": 0}), data=data)
    with pytest.raises(UnsupportedError, match="--width needs a slimmable model"):
        export_width(flat, 0.5, "never.onnx")


class _Concat(nn.Module):
    """Two branches concatenated: the consumer keeps non-adjacent input channels per width."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.mix = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(torch.relu(self.mix(torch.cat([self.a(x), self.b(x)], 1))))


def test_concatenated_branches_slice_their_own_channels(data, tmp_path):
    torch.manual_seed(0)
    sm, _ = lighten.compress(_Concat(), SlimmableConfig(widths=[1.0, 0.5], finetune={
        "epochs": 0}, calibration_samples=64), data=data)
    assert sm.backbone.mix.ins[1] == [[0, 4], [8, 10]]  # a's first 4 and b's first 2
    x = _x(data)
    plain = sm.at_width(0.5)
    assert plain.mix.in_channels == 6
    path = tmp_path / "half.onnx"
    export_width(sm, 0.5, path, sample_inputs=(x,))
    deployed = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(deployed - sm.eval().set_width(0.5)(x).numpy()).max() <= 1e-5
