"""share.tie: structurally identical blocks found (ResNet stages, transformer layers), tied
parameters stored once in the artifact (alias entries), still tied after reload and after
fine-tuning (one parameter, summed gradients), threshold and named groups, recipe + verb."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import lighten
from lighten.artifact import describe_artifact, load_artifact, save_artifact
from lighten.cli.main import main
from lighten.data import DataSpec, load_data
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.models import ZOO
from lighten.share.tie import TieConfig, find_tie_groups, tie_blocks_

X = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return ZOO["resnet20"](input_shape=(1, 8, 8)).eval()


def test_auto_finds_the_repeated_resnet_blocks():
    groups = find_tie_groups(_resnet())
    # layers.3 and layers.6 downsample (a 1x1 shortcut): they differ from the rest of their stage
    assert groups == [["layers.0", "layers.1", "layers.2"], ["layers.4", "layers.5"],
                      ["layers.7", "layers.8"]]


def test_tied_blocks_are_stored_once_and_reload_tied(tmp_path):
    model = _resnet()
    spec = {"model_spec": {"zoo": "resnet20"}, "input_shape": [1, 8, 8], "num_classes": 10}
    dense = save_artifact(model, tmp_path / "dense.safetensors", **spec)
    rows = tie_blocks_(model, TieConfig())
    assert model.layers[1].conv1.weight is model.layers[0].conv1.weight
    assert model.layers[1].bn1.weight is not model.layers[0].bn1.weight  # norms: false
    tied = save_artifact(model, tmp_path / "tied.safetensors", **spec)
    saved = sum(r["bytes_saved"] for r in rows)
    assert saved == 4 * (4 * 16 * 16 * 9 + 2 * 32 * 32 * 9 + 2 * 64 * 64 * 9)  # copies of convs
    assert dense - tied == pytest.approx(saved, rel=0.01)
    entries = {r["name"]: r for r in describe_artifact(tmp_path / "tied.safetensors")}
    assert entries["layers.2.conv2.weight"]["encoding"] == "alias"
    assert entries["layers.0.conv2.weight"]["encoding"] == "dense"

    loaded, _ = load_artifact(tmp_path / "tied.safetensors")
    assert loaded.layers[2].conv2.weight is loaded.layers[0].conv2.weight
    assert loaded.layers[8].conv1.weight is loaded.layers[7].conv1.weight
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), model(X))
    check = export_onnx(loaded, tmp_path / "tied.onnx", input_shape=(1, 8, 8), sample_inputs=X)
    assert check.max_abs_diff < 1e-4


def test_finetune_keeps_blocks_tied_and_the_artifact_too(tmp_path):
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8]))
    model = _resnet()
    before = model.layers[1].conv1.weight.detach().clone()
    out, report = lighten.compress(model, TieConfig(init="mean", finetune={"epochs": 1,
                                                                           "lr": 0.05}),
                                   data=data)
    shared = out.layers[0].conv1.weight
    assert out.layers[1].conv1.weight is shared and out.layers[2].conv1.weight is shared
    assert not torch.equal(shared, before)
    assert report.summary["tied_blocks"] == 4 and report.summary["tie_bytes_saved"] > 0
    save_artifact(out, tmp_path / "t.safetensors", model_spec={"zoo": "resnet20"},
                  input_shape=[1, 8, 8], num_classes=10)
    loaded, _ = load_artifact(tmp_path / "t.safetensors")
    assert loaded.layers[2].conv1.weight is loaded.layers[0].conv1.weight
    # one optimizer step on the reloaded model moves every use together
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded.train()(X).sum().backward()
    opt.step()
    assert torch.equal(loaded.layers[1].conv1.weight, loaded.layers[0].conv1.weight)


def test_tie_then_pq_keeps_one_pq_module_per_tied_weight(tmp_path):
    from lighten.share.pq import PQConfig, PQConv2d, product_quantize_

    model = _resnet()
    tie_blocks_(model, TieConfig())
    product_quantize_(model, PQConfig(codebook_bits=4))
    assert isinstance(model.layers[0].conv1, PQConv2d)
    assert model.layers[2].conv1 is model.layers[0].conv1
    assert model.layers[8].conv2 is model.layers[7].conv2
    save_artifact(model, tmp_path / "tp.safetensors", model_spec={"zoo": "resnet20"},
                  input_shape=[1, 8, 8], num_classes=10)
    entries = {r["name"]: r for r in describe_artifact(tmp_path / "tp.safetensors")}
    assert entries["layers.1.conv1.codes"]["encoding"] == "alias"
    loaded, _ = load_artifact(tmp_path / "tp.safetensors")
    assert loaded.layers[1].conv1 is loaded.layers[0].conv1
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), model(X))


def test_transformer_layers_tie_albert_style(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 3,
                                                                  enable_nested_tensor=False))
    groups = find_tie_groups(model, norms=True)
    assert groups == [["1.layers.0", "1.layers.1", "1.layers.2"]]
    tie_blocks_(model, TieConfig(norms=True))
    layers = model[1].layers
    assert layers[2].self_attn.in_proj_weight is layers[0].self_attn.in_proj_weight
    assert layers[1].norm1.weight is layers[0].norm1.weight
    params = sum(p.numel() for p in model.parameters())
    assert params == 8 * 16 + 16 + sum(p.numel() for p in layers[0].parameters())


def test_threshold_and_named_blocks():
    model = _resnet()
    with torch.no_grad():  # layers.2 a near copy of layers.1; others far apart
        for a, b in zip(model.layers[1].parameters(), model.layers[2].parameters(), strict=True):
            b.copy_(a * 1.01)
    rows = tie_blocks_(model, TieConfig(threshold=0.05))
    assert [(r["module"], r["after"]) for r in rows] == [("layers.2", "tied to layers.1")]
    assert rows[0]["distance"] == pytest.approx(0.0099, abs=1e-3)
    named = _resnet()
    tie_blocks_(named, TieConfig(blocks=[["layers.4", "layers.5"]]))
    assert named.layers[5].conv2.weight is named.layers[4].conv2.weight
    assert named.layers[1].conv2.weight is not named.layers[0].conv2.weight
    with pytest.raises(UnsupportedError, match="not structurally identical"):
        tie_blocks_(_resnet(), TieConfig(blocks=[["layers.3", "layers.4"]]))
    with pytest.raises(UnsupportedError, match="no blocks to tie"):
        tie_blocks_(_resnet(), TieConfig(threshold=0.01))
    ignored = _resnet()
    tie_blocks_(ignored, TieConfig(ignore=["layers.0.conv1"]))
    assert ignored.layers[2].conv1.weight is ignored.layers[1].conv1.weight
    assert ignored.layers[1].conv1.weight is not ignored.layers[0].conv1.weight


MODELS = '''
from torch import nn


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(3))
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = self.inp(x.flatten(1))
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def stack():
    return Stack()
'''


@pytest.mark.parametrize("model", ["{zoo: resnet20}",
                                   "{python: models.py:stack, input_shape: [1, 8, 8]}"])
def test_through_lighten_run(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""
        name: tie
        model: {model}
        data: {{name: digits}}
        train: {{epochs: 0, lr: 0.01, batch_size: 64}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: out
        steps:
          - share.tie: {{blocks: auto, finetune: {{epochs: 0.2}}}}
    """))
    assert main(["run", "r.yaml", "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["stage"] == "share.tie" and rows[-1]["bytes"] < rows[0]["bytes"]
    assert rows[-1]["params"] < rows[0]["params"]
    loaded, _ = load_artifact(tmp_path / "out/stages/01-share.tie.safetensors")
    shared = {id(p) for p in loaded.parameters()}
    assert len(shared) < len(loaded.state_dict())
