import pytest
import torch
from torch import nn

from lighten.measure import count_macs
from lighten.models import ZOO
from lighten.prune.structured import ChannelPruneConfig, prune_channels_


def test_round_to_keeps_channel_counts_at_multiples_and_meets_the_mac_target():
    torch.manual_seed(0)
    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 16, 16)).eval()
    x = torch.randn(2, 1, 16, 16)
    before = count_macs(model, (1, 16, 16))
    prune_channels_(model, ChannelPruneConfig(target_macs=0.5, round_to=8), x)
    widths = {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert widths and all(w % 8 == 0 for w in widths), widths
    after = count_macs(model, (1, 16, 16))
    assert 0.42 * before < after <= 0.5 * before  # channels given back up to the target
    assert model(x).shape == (2, 10)


def test_round_to_adds_back_the_best_scored_channels():
    from lighten.prune.structured import _round_up

    keep = torch.tensor([0, 5, 9])
    scores = torch.arange(12, dtype=torch.float)  # channel 11 scores best, then 10, ...
    grown = _round_up(keep, 12, scores, 4)
    assert grown.tolist() == [0, 5, 9, 11]


@pytest.mark.parametrize(("cpu", "block"), [("avx512", 16), ("avx2", 8), ("generic", 8)])
def test_round_to_auto_uses_the_target_cpu_channel_block(cpu, block):
    from lighten.target import Target

    torch.manual_seed(0)
    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 16, 16)).eval()
    x = torch.randn(2, 1, 16, 16)
    report = prune_channels_(model, ChannelPruneConfig(target_macs=0.6, round_to="auto"), x,
                             target=Target(cpu=cpu))
    widths = {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert all(w % block == 0 for w in widths), widths
    assert any(w < 64 for w in widths)
    assert f"multiples of {block} channels" in " ".join(report.notes)


@pytest.mark.parametrize("bad", [0, -8, "fast"])
def test_round_to_refuses_what_is_not_a_positive_count_or_auto(bad):
    with pytest.raises(ValueError, match="round_to"):
        ChannelPruneConfig(target_macs=0.5, round_to=bad)


def test_a_ratio_that_rounds_back_to_every_full_width_is_said_and_not_fine_tuned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    tuned = []
    report = prune_channels_(model, ChannelPruneConfig(ratio=0.2, round_to=8), x,
                             finetune=lambda m, share: tuned.append(share))
    assert report.channels_after == report.channels_before and tuned == []
    assert any("nothing was removed: rounded to multiples of 8" in n for n in report.notes)
    torch.testing.assert_close(model(x), before)
