"""prune.layers: residual blocks found by tracing are removed; MACs/params drop by exactly the
removed blocks, the post-add activation survives, ONNX and artifacts agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.measure import count_macs, count_params
from lighten.models import ZOO
from lighten.prune.layers import (
    LayerPruneConfig,
    SkippedBlock,
    find_residual_blocks,
    prune_layers_,
)
from lighten.registry import get_step

SHAPE = (1, 8, 8)


def randn(n, *shape, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def labelled(x, classes=10):
    return lambda: [(x, torch.arange(len(x)) % classes)]


def zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ZOO[name](input_shape=SHAPE).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


class Block(nn.Module):
    """relu(x + scale * fc(x)), written with a functional ReLU."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.scale = scale

    def forward(self, x):
        return F.relu(x + self.scale * self.fc(x))


class PlainBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(x) + x  # branch first, no activation after


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.Sequential(Block(8, 1.0), Block(8, 0.01), PlainBlock(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_zoo_count_two_removes_two_blocks(tmp_path: Path, name: str):
    model, x = zoo(name), randn(4, *SHAPE)
    macs, params = count_macs(model, SHAPE), count_params(model)[0]
    blocks, _ = find_residual_blocks(model, x[:1])
    report = prune_layers_(model, LayerPruneConfig(count=2), x[:1], batches=labelled(x))
    assert len(report.removed) == 2 and set(report.removed) <= {b.path for b in blocks}
    fresh = zoo(name)
    gone = [fresh.get_submodule(p) for p in report.removed]
    assert params - count_params(model)[0] == sum(count_params(b)[0] for b in gone) > 0
    assert report.macs_after == count_macs(model, SHAPE) < macs
    assert model(x).shape == (4, 10)

    check = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, sample_inputs=x)
    assert check.max_abs_diff < 1e-4
    path = tmp_path / "m.safetensors"
    save_artifact(model, path, model_spec={"zoo": name}, input_shape=SHAPE, num_classes=10)
    loaded, _ = load_artifact(path)  # a fresh, unpruned skeleton
    assert [type(loaded.get_submodule(p)) for p in report.removed] == [
        type(model.get_submodule(p)) for p in report.removed]
    torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-6, rtol=0)


def test_resnet20_blocks_and_projection_notes():
    model = zoo("resnet20")
    blocks, notes = find_residual_blocks(model, torch.zeros(1, *SHAPE))
    assert [b.path for b in blocks] == [f"layers.{i}" for i in (0, 1, 2, 4, 5, 7, 8)]
    assert all(len(n) for n in notes) and [n.split(":")[0] for n in notes] == [
        "layers.3", "layers.6"]
    assert all([type(a) for a in b.activations] == [nn.ReLU] for b in blocks)


def test_mobilenet_blocks_become_identity():
    model, x = zoo("mobilenetv2"), randn(2, *SHAPE)
    report = prune_layers_(model, LayerPruneConfig(count=1, importance="random"), x[:1])
    assert isinstance(model.get_submodule(report.removed[0]), nn.Identity)


def test_post_add_activation_is_kept_and_branch_l2_picks_the_weakest():
    torch.manual_seed(0)
    model, x = Toy().eval(), randn(16, 6)
    blocks, _ = find_residual_blocks(model, x[:1])
    assert [b.path for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    report = prune_layers_(model, LayerPruneConfig(count=1), x[:1], batches=labelled(x, 3))
    assert report.removed == ["blocks.1"]  # its branch is scaled by 0.01
    assert report.scores["blocks.1"] < 0.05 * report.scores["blocks.0"]
    assert isinstance(model.blocks[1], SkippedBlock)
    h = model.blocks[0](model.inp(x))
    torch.testing.assert_close(model.blocks[1](h), F.relu(h))  # relu(x + 0) == relu(x)
    h = -torch.ones(2, 8)
    assert torch.equal(model.blocks[1](h), torch.zeros(2, 8))  # not the identity


def test_taylor_removes_a_branch_that_does_not_matter():
    torch.manual_seed(0)
    model, x = Toy().eval(), randn(16, 6)
    with torch.no_grad():
        model.blocks[0].fc.weight.zero_()
        model.blocks[0].fc.bias.zero_()
    report = prune_layers_(model, LayerPruneConfig(count=1, importance="taylor"), x[:1],
                           batches=labelled(x, 3))
    assert report.removed == ["blocks.0"] and report.scores["blocks.0"] == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_ratio_ignore_and_errors():
    torch.manual_seed(0)
    x = randn(8, 6)
    model = Toy().eval()
    report = prune_layers_(model, LayerPruneConfig(ratio=0.9, ignore=["blocks.1"]), x[:1],
                           batches=labelled(x, 3))
    assert report.removed == ["blocks.0", "blocks.2"] and isinstance(model.blocks[2], nn.Identity)
    with pytest.raises(UnsupportedError, match="only 3 removable"):
        prune_layers_(Toy(), LayerPruneConfig(count=4), x[:1], batches=labelled(x, 3))
    with pytest.raises(UnsupportedError, match="no module named 'nope'"):
        prune_layers_(Toy(), LayerPruneConfig(count=1, ignore=["nope"]), x[:1])
    with pytest.raises(UnsupportedError, match="needs calibration data"):
        prune_layers_(Toy(), LayerPruneConfig(count=1), x[:1])
    with pytest.raises(UnsupportedError, match="no removable residual block"):
        prune_layers_(ZOO["lenet5"](input_shape=SHAPE), LayerPruneConfig(count=1),
                      torch.zeros(1, *SHAPE))
    with pytest.raises(ValidationError, match="exactly one of count"):
        LayerPruneConfig(count=1, ratio=0.5)
    with pytest.raises(ValidationError):
        LayerPruneConfig(count=1, blocks=2)


def test_recipe_step_prunes_and_finetunes(tmp_path: Path):
    from lighten.data import DataSpec, load_data
    from lighten.step import FinetuneConfig, StepContext
    from lighten.training import TrainConfig

    step = get_step("prune.layers")
    assert step.config_type is LayerPruneConfig
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=list(SHAPE)))
    model = zoo("resnet20").train()
    ctx = StepContext(data=data, train_config=TrainConfig(batch_size=32), baseline=model,
                      workdir=tmp_path, progress=False)
    cfg = LayerPruneConfig(count=3, calibration_samples=32, finetune=FinetuneConfig(epochs=1))
    before = count_params(model)[0]
    out = step.apply(model, cfg, ctx)
    assert sum(isinstance(m, SkippedBlock) for m in out.modules()) == 3
    assert count_params(out)[0] < before
    assert any(n.startswith("prune.layers: removed 3") for n in ctx.notes)
    assert any("projection shortcut" in n for n in ctx.notes)


def test_a_pre_norm_pytorch_transformer_layer_is_a_removable_block(tmp_path):
    """nn.TransformerEncoderLayer(norm_first=True) computes x + attn(norm(x)) + ff(...): one
    residual chain, removed whole; the stock layer (fused, untraceable) is unfused first."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 3,
                                                                  enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(4 * 16, 5)).eval()
    x = torch.randn(6, 4, 8)
    report = prune_layers_(model, LayerPruneConfig(count=1), x, batches=labelled(x, 5))
    assert len(report.removed) == 1 and report.removed[0].startswith("1.layers.")
    gone = int(report.removed[0].rsplit(".", 1)[1])
    stack = model[1]
    assert isinstance(stack.layers[gone], SkippedBlock)
    h = model[0](x)  # the model is now the remaining two layers, run by hand
    for i, kept in enumerate(stack.layers):
        if i != gone:
            h = kept(h)
    torch.testing.assert_close(model(x), model[3](model[2](h)))
    path = tmp_path / "p.safetensors"
    save_artifact(model, path, model_spec=None, input_shape=[4, 8], num_classes=5)
    loaded, _ = load_artifact(path, model=None)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("count", [1, 2])
def test_an_unfused_stack_saves_after_its_first_or_every_layer_is_removed(count, tmp_path):
    from lighten.unfused import unfuse_

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16),
                                                enable_nested_tensor=False)).eval()
    unfuse_(model)
    x = torch.randn(3, 4, 16)
    for i in range(count):  # what prune.layers leaves: the first (or every) layer skipped
        model[0].layers[i] = SkippedBlock()
    path = tmp_path / "s.safetensors"
    save_artifact(model, path, model_spec=None, input_shape=[4, 16], num_classes=16)
    loaded, _ = load_artifact(path)
    torch.testing.assert_close(loaded(x), model(x))


def test_post_norm_transformer_layers_are_not_residual_blocks():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    with pytest.raises(UnsupportedError, match="no removable residual block found"):
        prune_layers_(model, LayerPruneConfig(count=1), torch.randn(2, 4, 16))
