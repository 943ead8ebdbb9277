"""Channel-dependency groups: residual adds, concat offsets, depthwise, flatten, SE, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lighten.errors import UnsupportedError
from lighten.graph import Member, channel_groups

X = torch.zeros(1, 1, 8, 8)


class SE(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc(pool(x)))."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s.view(s.size(0), -1, 1, 1)


class ToyNet(nn.Module):
    """Residual add, concat, depthwise conv, BN, SE, flatten -> Linear, LayerNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.res = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.res_bn = nn.BatchNorm2d(8)
        self.b1 = nn.Conv2d(8, 6, 1)
        self.b2 = nn.Conv2d(8, 4, 1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10, bias=False)
        self.dw_bn = nn.BatchNorm2d(10)
        self.pw = nn.Conv2d(10, 12, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(12)
        self.se = SE(12)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(12 * 4 * 4, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.res_bn(self.res(x)))
        x = torch.cat([self.b1(x), self.b2(x)], dim=1)
        x = F.relu(self.dw_bn(self.dw(x)))
        x = self.se(self.pw_bn(self.pw(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.ln(F.relu(self.fc1(x))))


def group_of(groups, member: Member):
    return next(g for g in groups if member in g.members)


def test_toy_groups_couple_the_right_tensors():
    groups = channel_groups(ToyNet(), X)
    res = group_of(groups, Member("stem.0", "out"))
    assert res.size == 8 and res.prunable
    assert {Member("stem.1", "norm"), Member("res", "out"), Member("res_bn", "norm"),
            Member("b1", "in"), Member("b2", "in")} <= set(res.members)
    # concat: b2's channels sit at offset 6 in the depthwise conv, its BN and the next conv
    b2 = group_of(groups, Member("b2", "out"))
    assert {Member("dw", "depthwise", 6), Member("dw_bn", "norm", 6),
            Member("pw", "in", 6)} <= set(b2.members)
    assert Member("dw", "depthwise", 0) in group_of(groups, Member("b1", "out")).members
    # SE multiply couples fc2's outputs with pw; flatten makes each channel 4*4 features of fc1
    pw = group_of(groups, Member("pw", "out"))
    assert {Member("se.fc2", "out"), Member("se.fc1", "in"), Member("pw_bn", "norm"),
            Member("fc1", "in", 0, 16)} <= set(pw.members)
    hidden = group_of(groups, Member("fc1", "out"))
    assert {Member("ln", "norm"), Member("fc2", "in")} <= set(hidden.members)
    assert "model output" in group_of(groups, Member("fc2", "out")).pinned
    assert "model input" in group_of(groups, Member("stem.0", "in")).pinned
    # every parameterized layer appears somewhere
    covered = {m.module for g in groups for m in g.members}
    assert covered == {n for n, m in ToyNet().named_modules() if list(m.parameters(False))}


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
        return self.head(x).mean((2, 3))


def test_channel_shuffle_ties_the_producer_and_interleaves_its_copies():
    groups = channel_groups(Shuffle(), X)
    # conv channel c and c + 4 are one channel; after the shuffle they sit side by side (block 2)
    tied = group_of(groups, Member("conv", "out"))
    assert tied.size == 4 and tied.prunable
    assert set(tied.members) == {Member("conv", "out", 0), Member("conv", "out", 4),
                                 Member("head", "in", 0, 2)}


class HardCodedShuffle(Shuffle):
    def forward(self, x):
        x = self.conv(x)
        x = x.view(-1, 2, 4, 6, 6).transpose(1, 2).reshape(-1, 8, 6, 6)
        return self.head(x).mean((2, 3))


def test_channel_shuffle_with_hard_coded_sizes_is_refused_naming_the_node():
    with pytest.raises(UnsupportedError, match=r"node 'view'.*hard-codes 4 channels per group"):
        channel_groups(HardCodedShuffle(), X)


class ConcatPlusOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 5, 1), nn.Conv2d(1, 8, 1)

    def forward(self, x):
        return (torch.cat([self.a(x), self.b(x)], 1) + self.c(x)).mean((2, 3))


def test_concat_joined_to_one_tensor_cuts_that_tensor():
    groups = {g.size: set(g.members) for g in channel_groups(ConcatPlusOne(), X)}
    assert groups[3] == {Member("a", "out"), Member("c", "out")}
    assert groups[5] == {Member("b", "out"), Member("c", "out", 3)}


def test_unknown_function_and_channel_reduction_are_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 1)

        def forward(self, x):
            return torch.cumsum(self.conv(x), 1).flatten(1)

    class ChannelMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 1)

        def forward(self, x):
            return self.conv(x).mean(1).flatten(1)

    with pytest.raises(UnsupportedError, match="cumsum is not understood"):
        channel_groups(Odd(), X)
    with pytest.raises(UnsupportedError, match="reduces over the channel axis"):
        channel_groups(ChannelMean(), X)


def test_grouped_conv_pins_its_groups_and_shared_modules_unify():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, groups=2)
            self.shared = nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.g(self.a(x))
            return self.head(self.shared(self.shared(y))).flatten(1)

    groups = channel_groups(Grouped(), X)
    # every group of g keeps the same channels: a's channel c and c + 4 are one channel
    tied = group_of(groups, Member("a", "out"))
    assert tied.size == 4 and tied.prunable
    assert {Member("a", "out", 4), Member("g", "in")} <= set(tied.members)
    # the conv called twice feeds itself: its input and output become one channel space, tied
    # like g's output that feeds it
    shared = group_of(groups, Member("shared", "out"))
    assert {Member("g", "out", 0), Member("g", "out", 4), Member("shared", "in", 4),
            Member("shared", "out", 4), Member("head", "in", 4)} <= set(shared.members)
    assert shared.size == 4 and shared.prunable


def test_grouped_conv_whose_groups_straddle_a_concat_is_kept_whole():
    class Straddle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 5, 1)
            self.g = nn.Conv2d(8, 8, 3, groups=2)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.g(torch.cat([self.a(x), self.b(x)], 1))).flatten(1)

    groups = channel_groups(Straddle(), X)
    for name in ("a", "b", "g"):
        pins = group_of(groups, Member(name, "out")).pinned
        assert any("grouped conv 'g' (groups=2) is kept whole" in p for p in pins), name


def test_untraceable_model_is_refused():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedError, match="torch.fx-traceable"):
        channel_groups(Dynamic(), X)


def test_transpose_moves_the_channel_axis_and_attention_heads_are_refused():
    class SeqConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.conv, self.out = nn.Linear(4, 6), nn.Conv1d(6, 5, 3), nn.Linear(5, 2)

        def forward(self, x):  # (B, 4, T)
            y = self.conv(self.inp(x.transpose(1, 2)).transpose(1, 2))  # (B, 6, T-2)
            return self.out(y.permute(0, 2, 1)).mean(1)

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 8)

        def forward(self, x):  # (B, 4, T)
            b, _, t = x.shape
            return self.q(x.transpose(1, 2)).view(b, t, 2, -1).transpose(1, 2).sum((1, 3))

    seq = torch.zeros(1, 4, 7)
    groups = channel_groups(SeqConv(), seq)
    assert Member("conv", "in") in group_of(groups, Member("inp", "out")).members
    assert Member("out", "in") in group_of(groups, Member("conv", "out")).members
    heads = group_of(channel_groups(Heads(), seq), Member("q", "out"))  # kept whole
    assert "split into attention heads at node 'transpose_1'" in heads.pinned[0]


def test_flatten_with_a_hard_coded_width_pins_those_channels():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 144))

    group = group_of(channel_groups(Fixed(), X), Member("conv", "out"))
    assert not group.prunable and any("hard-codes 144 channels" in p for p in group.pinned)
