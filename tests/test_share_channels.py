"""share.channels: planted duplicate filters merged exactly (outputs within 1e-5), shapes, MACs
and params shrink; residual groups merge only when every coupled layer repeats the channel;
count mode; groups normalized across channels skipped; artifact reload, ONNX, recipe + verb."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lighten
from lighten.artifact import load_artifact, save_artifact
from lighten.cli.main import main
from lighten.data import DataSpec, load_data
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.measure import count_macs, count_params
from lighten.share.channels import ChannelShareConfig, share_channels_


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    """Stem, a residual block (stem + conv2 share channels), flatten -> Linear -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.fc, self.head = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool2d(self.block(self.stem(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


def _net() -> Net:
    torch.manual_seed(0)
    model = Net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _copy_channel(layer: nn.Module, src: int, dst: int, bn: nn.Module | None = None,
                  noise: float = 0.0) -> None:
    with torch.no_grad():
        layer.weight[dst] = layer.weight[src] * (1 + noise)
        if layer.bias is not None:
            layer.bias[dst] = layer.bias[src]
        if bn is not None:
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[dst] = t[src]


def _planted() -> Net:
    model = _net()
    _copy_channel(model.block.conv1, 1, 5, model.block.bn1)
    _copy_channel(model.block.conv1, 2, 6, model.block.bn1)
    _copy_channel(model.fc, 3, 9)
    _copy_channel(model.fc, 3, 12)
    # the residual group: the stem and conv2 both repeat channel 0 as 7
    _copy_channel(model.stem[0], 0, 7, model.stem[1])
    _copy_channel(model.block.conv2, 0, 7, model.block.bn2)
    return model


X = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_planted_duplicates_merge_exactly_and_shrink():
    model = _planted()
    merged = copy.deepcopy(model)
    rows = share_channels_(merged, ChannelShareConfig(), X[:1])
    with torch.no_grad():
        assert (merged(X) - model(X)).abs().max() <= 1e-5
    assert merged.block.conv1.out_channels == 6 and merged.block.bn1.num_features == 6
    assert merged.block.conv2.in_channels == 6
    assert merged.stem[0].out_channels == 7 and merged.block.conv2.out_channels == 7
    assert merged.block.conv1.in_channels == 7 and merged.fc.in_features == 7 * 16
    assert merged.fc.out_features == 14 and merged.head.in_features == 14
    assert count_macs(merged, X[:1]) < count_macs(model, X[:1])
    assert count_params(merged)[0] < count_params(model)[0]
    assert {r["module"] for r in rows} == {"stem.0", "block.conv2", "block.conv1", "fc"}
    fc = next(r for r in rows if r["module"] == "fc")
    assert fc["merged"] == [[3, 9, 12]] and fc["max_distance"] == 0


def test_residual_group_needs_every_coupled_layer_to_repeat():
    model = _net()
    _copy_channel(model.stem[0], 0, 7, model.stem[1])  # conv2's channel 7 still differs
    merged = copy.deepcopy(model)
    rows = share_channels_(merged, ChannelShareConfig(threshold=0.0), X[:1])
    assert rows == [] and merged.stem[0].out_channels == 8
    _copy_channel(model.block.conv2, 0, 7, model.block.bn2)  # now every producer repeats it
    merged = copy.deepcopy(model)
    share_channels_(merged, ChannelShareConfig(threshold=0.0), X[:1])
    assert merged.stem[0].out_channels == merged.block.conv2.out_channels == 7
    with torch.no_grad():
        assert (merged(X) - model(X)).abs().max() <= 1e-5


def test_near_duplicates_within_threshold_and_count():
    model = _net()
    _copy_channel(model.block.conv1, 1, 5, model.block.bn1, noise=0.01)
    strict = copy.deepcopy(model)
    with pytest.raises(UnsupportedError, match="no channel group"):
        share_channels_(strict, ChannelShareConfig(threshold=0.001, ignore=["stem.0",
                        "block.conv2", "block.conv1", "fc"]), X[:1])
    loose = copy.deepcopy(model)
    rows = share_channels_(loose, ChannelShareConfig(threshold=0.05), X[:1])
    assert loose.block.conv1.out_channels == 7 and rows[0]["max_distance"] == pytest.approx(
        0.01, abs=2e-3)
    with torch.no_grad():
        assert (loose(X) - model(X)).abs().max() < 0.05 * model(X).abs().max()
    counted = copy.deepcopy(model)
    share_channels_(counted, ChannelShareConfig(count=4), X[:1])
    widths = (counted.stem[0].out_channels + counted.block.conv1.out_channels
              + counted.fc.out_features)
    assert widths == 8 + 8 + 16 - 4


def test_layernorm_groups_are_skipped_with_a_note():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16)
            self.c = nn.Linear(16, 4)

        def forward(self, x):
            return self.c(F.relu(self.b(self.norm(self.a(x.flatten(1))))))

    torch.manual_seed(0)
    model = MLP().eval()
    _copy_channel(model.a, 0, 1)
    _copy_channel(model.b, 2, 3)
    notes: list[str] = []
    share_channels_(model, ChannelShareConfig(), torch.randn(1, 1, 8), notes=notes)
    assert model.a.out_features == 16 and model.b.out_features == 15
    assert any("LayerNorm" in n and "across channels" in n for n in notes)


def test_onnx_runs_on_onnxruntime(tmp_path):
    model = _planted()
    share_channels_(model, ChannelShareConfig(), X[:1])
    check = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8), sample_inputs=X)
    assert check.max_abs_diff < 1e-4


def test_zoo_model_through_compress_is_exact_and_reloads(tmp_path):
    from lighten.models import ZOO

    torch.manual_seed(0)
    model = ZOO["lenet5"](input_shape=(1, 8, 8)).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    _copy_channel(convs[1], 0, 3)
    data = load_data(DataSpec(name="synthetic", samples=32, input_shape=[1, 8, 8]))
    out, report = lighten.compress(model, ChannelShareConfig(threshold=1e-6), data=data)
    with torch.no_grad():
        assert (out(X) - model(X)).abs().max() <= 1e-5
    assert report.summary["channels_merged"] == 1
    assert report.summary["macs_after"] < report.summary["macs_before"]
    save_artifact(out, tmp_path / "m.safetensors", model_spec={"zoo": "lenet5"},
                  input_shape=[1, 8, 8], num_classes=10)
    loaded, _ = load_artifact(tmp_path / "m.safetensors")
    assert loaded.state_dict().keys() == out.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), out(X))


MODELS = '''
import torch
from torch import nn


class Dup(nn.Module):
    """Filters 4..7 of conv1 copy 0..3 (kept so through training: tied in the forward)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def dup():
    model = Dup()
    with torch.no_grad():
        model.conv1.weight[4:] = model.conv1.weight[:4]
        model.conv1.bias[4:] = model.conv1.bias[:4]
    return model
'''


@pytest.mark.parametrize("model", ["{zoo: lenet5}",
                                   "{python: models.py:dup, input_shape: [1, 8, 8]}"])
def test_through_lighten_run(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""
        name: ch
        model: {model}
        data: {{name: digits}}
        train: {{epochs: 0, lr: 0.01, batch_size: 64}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: out
        steps:
          - share.channels: {{count: 2, finetune: {{epochs: 0.2}}}}
    """))
    assert main(["run", "r.yaml", "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["stage"] == "share.channels" and rows[-1]["macs"] < rows[0]["macs"]
    assert rows[-1]["params"] < rows[0]["params"]
