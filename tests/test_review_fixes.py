"""Regression tests for defects found reviewing grouped-conv pruning, dynamic LSTM and configs."""

import pytest
import torch
from torch import nn

from lighten.measure import count_macs
from lighten.prune.structured import ChannelPruneConfig, prune_channels_


class _GroupedNet(nn.Module):
    """A 16-channel stem feeding a 4-group conv: one group channel is 4 stem filters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_round_to_counts_layer_widths_not_group_channels_of_a_grouped_conv():
    torch.manual_seed(0)
    model = _GroupedNet().eval()
    x = torch.randn(2, 1, 8, 8)
    before = count_macs(model, (1, 8, 8))
    prune_channels_(model, ChannelPruneConfig(target_macs=0.5, round_to=8), x)
    assert model.stem.out_channels % 8 == 0 and model.grouped.out_channels % 8 == 0
    after = count_macs(model, (1, 8, 8))
    assert 0.3 * before < after <= 0.5 * before  # was 100%: round_to 8 > the 4-channel group
    assert model(x).shape == (2, 3)


def test_lstm_macs_are_counted_so_dynamic_quantization_does_not_inflate_them():
    from lighten.quant.dynamic import DynamicConfig, quantize_dynamic_

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True, num_layers=2, bidirectional=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model = Tagger().eval()
    steps = 5
    expected = (steps * 2 * (8 * 64 + 16 * 64)  # layer 0, both directions
                + steps * 2 * (32 * 64 + 16 * 64)  # layer 1 reads both directions
                + 32 * 4)
    assert count_macs(model, (steps, 8)) == expected
    quantize_dynamic_(model, DynamicConfig(reduce_range=False))
    assert count_macs(model, (steps, 8)) == expected


@pytest.mark.parametrize("keys", [{"adaround_iters": 10}, {"adaround_reg": 0.1}])
def test_adaround_options_without_adaround_are_refused(keys):
    from lighten.quant.weight_only import WeightOnlyConfig

    with pytest.raises(ValueError, match="method: adaround"):
        WeightOnlyConfig(method="rtn", **keys)
    assert WeightOnlyConfig(method="adaround", **keys).method == "adaround"


def test_temperature_without_distill_is_refused():
    from lighten.step import FinetuneConfig

    with pytest.raises(ValueError, match="distill"):
        FinetuneConfig(epochs=1, temperature=2.0)
    assert FinetuneConfig(epochs=1, distill=0.5, temperature=2.0).temperature == 2.0


class _SqueezeExcite(nn.Module):
    """SE written the common way: the gate is broadcast with ``s[:, :, None, None]``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.squeeze = nn.Linear(16, 4)
        self.excite = nn.Linear(4, 16)
        self.out = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        s = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3))))))
        return self.out(x * s[:, :, None, None])


def test_indexing_that_only_adds_axes_keeps_the_channels_followed():
    from lighten.graph import channel_groups

    model = _SqueezeExcite().eval()
    x = torch.randn(2, 3, 6, 6)
    groups = channel_groups(model, x)
    coupled = next(g for g in groups if any(m.module == "conv" and m.kind == "out"
                                            for m in g.members))
    assert {(m.module, m.kind) for m in coupled.members} >= {
        ("conv", "out"), ("squeeze", "in"), ("excite", "out"), ("out", "in")}
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, ignore=["out"]), x)
    assert model.conv.out_channels == 8 and model.excite.out_features == 8
    assert model(x).shape == (2, 8, 6, 6)


@pytest.mark.parametrize("index", [lambda x: x[:, 0], lambda x: x[:, :4],
                                   lambda x: x[..., None][:, 1:]])
def test_indexing_that_selects_channels_is_still_refused(index):
    from lighten.errors import UnsupportedError
    from lighten.graph import channel_groups

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            x = self.conv(x)
            return index(x)

    with pytest.raises(UnsupportedError, match="select channels"):
        channel_groups(Net().eval(), torch.randn(1, 3, 4, 4))


class _Offsets(nn.Module):
    """A per-channel offset after conv ``a``, kept as a buffer; conv ``b`` follows."""

    def __init__(self, persistent: bool):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("pe", torch.randn(1, 8, 1, 1), persistent=persistent)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x) + self.pe)))
        return self.head(x.mean((2, 3)))


def test_a_non_persistent_buffer_pins_its_channels_and_a_persistent_one_is_sliced():
    from lighten.graph import channel_groups

    x = torch.randn(2, 1, 6, 6)
    pinned = next(g for g in channel_groups(_Offsets(False).eval(), x)
                  if any(m.module == "a" for m in g.producers()))
    assert not pinned.prunable and "non-persistent" in " ".join(pinned.pinned)
    model = _Offsets(False).eval()
    prune_channels_(model, ChannelPruneConfig(ratio=0.5), x)
    assert model.a.out_channels == 8 and model.b.out_channels == 4 and model.pe.shape[1] == 8
    model = _Offsets(True).eval()
    prune_channels_(model, ChannelPruneConfig(ratio=0.5), x)
    assert model.a.out_channels == 4 and model.pe.shape == (1, 4, 1, 1)


def test_a_parameter_that_widens_the_channel_axis_is_named_as_such():
    from lighten.errors import UnsupportedError
    from lighten.graph import channel_groups

    class Widen(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.w = nn.Parameter(torch.ones(1, 8, 1, 1))
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(torch.sigmoid(self.conv(x)) * self.w)

    with pytest.raises(UnsupportedError, match="'w' has 8 channels where the tensor"):
        channel_groups(Widen().eval(), torch.randn(1, 1, 4, 4))
