"""prune.channels / prune.neurons: layers shrink, outputs keep shape, ONNX and artifacts agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.graph import Member
from lighten.measure import count_macs
from lighten.models import ZOO
from lighten.prune.structured import (
    ChannelPruneConfig,
    NeuronPruneConfig,
    apply_keep_,
    prunable_groups,
    prune_channels_,
)
from lighten.registry import get_step
from tests.test_graph import ToyNet

X1 = torch.zeros(1, 1, 8, 8)


def toy(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    model = ToyNet().eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model


def batch(n=4, shape=(1, 8, 8)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def test_ratio_half_shrinks_every_coupled_tensor(tmp_path: Path):
    model, x = toy(), batch()
    macs = count_macs(model, (1, 8, 8))
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.5), X1)
    assert model.stem[0].weight.shape == (4, 1, 3, 3) and model.res.weight.shape == (4, 4, 3, 3)
    assert model.b1.out_channels == 3 and model.b2.out_channels == 2
    assert model.dw.weight.shape == (5, 1, 3, 3) and model.dw.groups == 5
    assert model.dw_bn.running_mean.shape == (5,) and model.pw.weight.shape == (6, 5, 1, 1)
    assert model.se.fc2.out_features == 6 and model.se.fc1.in_features == 6
    assert model.fc1.in_features == 6 * 16 and model.fc1.out_features == 16  # neurons untouched
    assert model(x).shape == (4, 10)
    assert report.macs_after == count_macs(model, (1, 8, 8)) < 0.5 * macs

    from lighten.export import export_onnx

    check = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8), sample_inputs=x)
    assert check.max_abs_diff < 1e-4


def test_artifact_round_trip_into_fresh_skeleton(tmp_path: Path):
    model, x = toy(), batch()
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance="fpgm"), X1)
    path = tmp_path / "pruned.safetensors"
    save_artifact(model, path, model_spec={"python": "tests/test_graph.py:ToyNet",
                                           "input_shape": [1, 8, 8]},
                  input_shape=(1, 8, 8), num_classes=10)
    loaded, manifest = load_artifact(path, model=ToyNet())
    assert {e["path"] for e in manifest["edits"] if e["op"] == "module"} >= {
        "pw", "dw", "se.fc2", "fc1"}
    assert loaded.dw.groups == 5
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_removing_a_dead_channel_changes_nothing():
    """Zero one channel's filter and BN affine: it carries exact zeros, so cutting it is exact."""
    model, x = toy(), batch()
    with torch.no_grad():
        model.pw.weight[3] = 0
        model.pw_bn.weight[3] = 0
        model.pw_bn.bias[3] = 0
        before = model(x)
    groups = prunable_groups(model, X1)
    keeps = [torch.arange(g.size) for g in groups]
    target = next(i for i, g in enumerate(groups) if Member("pw", "out") in g.members)
    keeps[target] = torch.tensor([c for c in range(12) if c != 3])
    apply_keep_(model, groups, keeps)
    assert model.pw.out_channels == 11 and model.fc1.in_features == 11 * 16
    # exact up to float summation order (11 vs 12 terms in fc1 and pw_bn's neighbours)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "bn_scale", "random"])
def test_every_importance_prunes_exactly_per_group(importance):
    model = toy()
    prune_channels_(model, ChannelPruneConfig(ratio=0.25, importance=importance), X1)
    assert (model.stem[0].out_channels, model.pw.out_channels, model.b1.out_channels) == (6, 9, 4)


def test_l2_removes_the_weakest_filters():
    model = toy()
    with torch.no_grad():
        model.b1.weight[[1, 4]] *= 1e-3
        model.dw.weight[[1, 4]] *= 1e-3  # depthwise kernels also produce b1's channels
        kept = model.b1.weight[[0, 2, 3, 5]].clone()
    # ignoring `res` keeps the residual channels, so b1's input side stays whole
    prune_channels_(model, ChannelPruneConfig(ratio=0.34, importance="l2", ignore=["res"]), X1)
    assert model.stem[0].out_channels == 8
    torch.testing.assert_close(model.b1.weight, kept)


def test_target_macs_iterative_global_with_finetune_hook():
    model = toy()
    base = count_macs(model, (1, 8, 8))
    calls = []
    report = prune_channels_(model, ChannelPruneConfig(target_macs=0.6, iterative_steps=2,
                                                       global_ranking=True), X1,
                             finetune=lambda m, share: calls.append(share))
    assert calls == [0.5, 0.5]
    assert 0.45 * base <= report.macs_after <= 0.6 * base
    assert model(batch()).shape == (4, 10)


def test_ignore_keeps_output_channels_and_config_errors():
    model = toy()
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, ignore=["pw"]), X1)
    assert model.pw.out_channels == 12 and model.b1.out_channels == 3
    with pytest.raises(UnsupportedError, match="no module named 'nope'"):
        prune_channels_(toy(), ChannelPruneConfig(ratio=0.5, ignore=["nope"]), X1)
    with pytest.raises(ValidationError, match="exactly one of"):
        ChannelPruneConfig(ratio=0.5, target_macs=0.5)
    with pytest.raises(ValidationError):
        ChannelPruneConfig(ratio=0.5, bogus=1)
    with pytest.raises(UnsupportedError, match="needs labelled data"):
        prune_channels_(toy(), ChannelPruneConfig(ratio=0.5, importance="taylor"), X1)


def test_taylor_uses_gradients_from_labelled_batches():
    model = toy()
    data = [(batch(8), torch.arange(8) % 10)]
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance="taylor"), X1,
                    batches=lambda: iter(data))
    assert model.pw.out_channels == 6 and model(batch()).shape == (4, 10)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_zoo_models_reach_half_the_macs(name):
    torch.manual_seed(0)
    model = ZOO[name](input_shape=(1, 8, 8)).eval()
    base = count_macs(model, (1, 8, 8))
    report = prune_channels_(model, ChannelPruneConfig(target_macs=0.5), X1)
    assert 0.4 * base <= report.macs_after <= 0.5 * base
    assert report.params_after < report.params_before
    assert model(batch()).shape == (4, 10)


def test_neurons_step_from_the_registry_prunes_hidden_linear_features(tmp_path: Path):
    from lighten.data import DataSpec, load_data
    from lighten.step import FinetuneConfig, StepContext
    from lighten.training import TrainConfig

    step = get_step("prune.neurons")
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8]))
    model = ZOO["lenet300"](input_shape=(1, 8, 8))
    ctx = StepContext(data=data, train_config=TrainConfig(batch_size=32), baseline=model,
                      workdir=tmp_path, progress=False)
    cfg = NeuronPruneConfig(ratio=0.5, importance="taylor", calibration_samples=32,
                            finetune=FinetuneConfig(epochs=1))
    step.apply(model, cfg, ctx)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 150), (150, 50), (50, 10)]
    assert any("prune.neurons" in n for n in ctx.notes)
    assert get_step("prune.channels").config_type is ChannelPruneConfig


def test_group_l2_counts_the_consumer_columns_of_a_channel():
    """Two channels with equal filters: the one the next layer reads harder scores higher."""
    from torch import nn

    from lighten.graph import channel_groups
    from lighten.prune.importance import group_l2, l2

    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU(), nn.Conv2d(2, 1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.copy_(torch.tensor([1.0, 3.0]).view(1, 2, 1, 1))
    group = next(g for g in channel_groups(model, torch.randn(1, 1, 4, 4)) if g.size == 2)
    assert torch.equal(l2(model, group), torch.ones(2))  # filters alone cannot tell them apart
    scores = group_l2(model, group)
    # producer votes (1, 1) / 1, consumer votes (1, 9) / 5: mean per channel
    assert torch.allclose(scores, torch.tensor([(1 + 0.2) / 2, (1 + 1.8) / 2]))
