"""Structured pruning through grouped convs and channel shuffles (ShuffleNet, ResNeXt blocks).

A conv with g groups keeps the same channels in every group, and a shuffle maps kept channels
through its permutation; the pruned model must equal the original with those channels zeroed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lighten.errors import UnsupportedError
from lighten.measure import count_macs, count_params
from lighten.prune.importance import make_importance
from lighten.prune.structured import (
    ChannelPruneConfig,
    apply_keep_,
    plan_keep,
    prunable_groups,
    prune_channels_,
)
from lighten.prune.surgery import prune_module_

SHAPE = (1, 8, 8)


def shuffle_view(x, g):
    n, c, h, w = x.size()
    return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def shuffle_permute(x, g):
    n, _, h, w = x.shape
    return x.reshape(n, g, -1, h, w).permute(0, 2, 1, 3, 4).reshape(n, -1, h, w)


def shuffle_flatten(x, g):
    n, c, h, w = x.size()
    return torch.transpose(x.view(n, g, -1, h, w), 1, 2).flatten(1, 2)


SPELLINGS = {"view": shuffle_view, "permute": shuffle_permute, "flatten": shuffle_flatten}


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, then a
    residual add (stride 1) or a concat with the pooled input (stride 2)."""

    def __init__(self, c_in: int, c_out: int, mid: int, *, groups: int = 2,
                 concat: bool = False, spelling: str = "view"):
        super().__init__()
        self.groups, self.concat, self.spelling = groups, concat, spelling
        self.g1 = nn.Conv2d(c_in, mid, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle = nn.ChannelShuffle(groups) if spelling == "module" else nn.Identity()
        self.dw = nn.Conv2d(mid, mid, 3, stride=2 if concat else 1, padding=1, groups=mid,
                            bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.g2 = nn.Conv2d(mid, c_out - c_in if concat else c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(self.g2.out_channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.g1(x)))
        y = self.shuffle(y) if self.spelling == "module" else SPELLINGS[self.spelling](
            y, self.groups)
        y = self.bn3(self.g2(self.bn2(self.dw(y))))
        if self.concat:
            return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), y], 1))
        return F.relu(x + y)


class TinyShuffleNet(nn.Module):
    def __init__(self, spelling: str = "view"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.unit1 = ShuffleUnit(8, 8, 8, spelling=spelling)
        self.unit2 = ShuffleUnit(8, 16, 8, concat=True, spelling=spelling)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.unit2(self.unit1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyResNeXt(nn.Module):
    """ResNeXt bottleneck: 1x1 -> grouped 3x3 (4 groups, widening) -> 1x1, residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c1, self.bn1 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False), \
            nn.BatchNorm2d(16)
        self.c3, self.bn3 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.c1(x)))
        y = F.relu(self.bn2(self.c2(y)))
        x = F.relu(x + self.bn3(self.c3(y)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


MODELS = {"shuffle-view": lambda: TinyShuffleNet("view"),
          "shuffle-permute": lambda: TinyShuffleNet("permute"),
          "shuffle-flatten": lambda: TinyShuffleNet("flatten"),
          "shuffle-module": lambda: TinyShuffleNet("module"),
          "resnext": TinyResNeXt}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def batch(n: int = 4) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def masked(model: nn.Module, groups, keeps) -> nn.Module:
    """The original with every removed channel silenced where it is made (filters, BN affine):
    removed channels then carry exact zeros, so the pruned model must compute the same."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for group, keep in zip(groups, keeps, strict=True):
            gone = torch.tensor([c for c in range(group.size) if c not in set(keep.tolist())],
                                dtype=torch.long)
            for m in group.members:
                if m.kind == "in" or len(gone) == 0:
                    continue
                module = ref.get_submodule(m.module)
                idx = m.indices(gone)
                module.weight[idx] = 0
                if module.bias is not None:
                    module.bias[idx] = 0
    return ref


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_masked_original(name):
    model, x = build(name), batch()
    groups = prunable_groups(model, x[:1])
    scores = [make_importance("l2")(model, g) for g in groups]
    keeps = plan_keep(groups, scores, 0.5)
    reference = masked(model, groups, keeps)(x)
    apply_keep_(model, groups, keeps)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert convs and all(m.out_channels % m.groups == 0 and m.in_channels % m.groups == 0
                         for m in convs)


@pytest.mark.parametrize("name", ["shuffle-view", "shuffle-permute", "resnext"])
def test_ratio_half_shrinks_exports_and_matches_onnx_runtime(name, tmp_path: Path):
    from lighten.export import export_onnx

    model, x = build(name), batch()
    before = count_params(model)[0]
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.5), x[:1])
    assert model(x).shape == (4, 10)
    assert count_params(model)[0] == report.params_after < 0.6 * before
    assert count_macs(model, SHAPE) == report.macs_after < 0.5 * report.macs_before
    if name == "resnext":  # 4 groups keep 1 of 2 inputs and 2 of 4 filters each
        assert (model.c2.groups, model.c2.in_channels, model.c2.out_channels) == (4, 4, 8)
        assert model.stem[0].out_channels == 8 and model.c3.out_channels == 8
    else:  # channel c and c + 4 of unit1's input are tied by the 2-group conv that reads it
        assert model.unit1.g1.groups == 2 and model.unit1.g1.in_channels == 4
        assert model.unit1.dw.groups == model.unit1.g1.out_channels == 4
    check = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, sample_inputs=x)
    assert check.max_abs_diff < 1e-4


def test_mac_target_and_iterative_steps_reanalyse_the_pruned_groups():
    model, x = build("shuffle-view"), batch()
    base = count_macs(model, SHAPE)
    report = prune_channels_(model, ChannelPruneConfig(target_macs=0.6, iterative_steps=2), x[:1])
    assert report.macs_after <= 0.6 * base
    assert model(x).shape == (4, 10)


def test_grouped_conv_surgery_matches_per_group_slices():
    """Independent reference: run each group as its own conv on sliced original weights."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(8, 12, 3, padding=1, groups=2), torch.randn(2, 8, 5, 5)
    keep_in, keep_out = torch.tensor([0, 3]), torch.tensor([1, 4])  # per group (4 in, 6 out)
    pruned = copy.deepcopy(conv)
    prune_module_(pruned, "in", keep_in)
    prune_module_(pruned, "out", torch.cat([keep_out, keep_out + 6]))
    assert (pruned.in_channels, pruned.out_channels, pruned.groups) == (4, 4, 2)
    parts = [F.conv2d(x[:, 4 * j + keep_in], conv.weight[6 * j + keep_out][:, keep_in],
                      conv.bias[6 * j + keep_out], padding=1) for j in range(2)]
    got = pruned(torch.cat([x[:, 4 * j + keep_in] for j in range(2)], 1))
    torch.testing.assert_close(got, torch.cat(parts, 1))
    with pytest.raises(UnsupportedError, match="unequal groups"):
        prune_module_(copy.deepcopy(conv), "out", torch.tensor([0, 1, 2]))


class ChannelSplit(nn.Module):
    """Halves (chunk(2), ShuffleNet v2) are followed; a cut computed some other way is not."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 8, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        a, b = y.split([y.size(1) // 4, y.size(1) - y.size(1) // 4], dim=1)
        return self.head(a).flatten(1)


class HardCodedMerge(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        n, c, h, w = x.size()
        y = self.conv(x).view(n, 2, -1, h, w).transpose(1, 2).reshape(n, 8, h, w)
        return self.head(y).flatten(1)


class WrongAxes(HardCodedMerge):
    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 3).reshape(n, c, h, w)
        return self.head(y).flatten(1)


@pytest.mark.parametrize("model, message", [
    (ChannelSplit(), r"node 'split'.*sizes computed at run time"),
    (HardCodedMerge(), r"node 'reshape'.*hard-codes 8 channels.*x\.size\(1\)"),
    (WrongAxes(), r"node 'transpose'.*other than by swapping its halves"),
])
def test_unhandled_variants_are_refused_naming_the_node(model, message):
    with pytest.raises(UnsupportedError, match=message):
        prune_channels_(model, ChannelPruneConfig(ratio=0.5), torch.zeros(1, 1, 4, 4))


def test_member_rows_follow_the_shuffled_blocks():
    """After a shuffle a depthwise conv holds `block` filters per channel: rows() gathers
    exactly the filters that indices() would slice (what importance criteria should score)."""
    model = build("shuffle-view")
    groups = prunable_groups(model, batch(1))
    group = next(g for g in groups if any(m.module == "unit1.dw" for m in g.members))
    for m in (m for m in group.members if m.module in ("unit1.dw", "unit1.bn2")):
        assert m.block == 2
        weight = model.get_submodule(m.module).weight.detach()
        rows = m.rows(weight, group.size)
        for c in range(group.size):
            torch.testing.assert_close(rows[c], weight[m.indices(torch.tensor([c]))].flatten())
