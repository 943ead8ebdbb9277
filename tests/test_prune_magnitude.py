import pytest
import torch
from torch import nn

from lighten.errors import UnsupportedError
from lighten.prune.magnitude import (
    MagnitudePruneConfig,
    agp_sparsity,
    magnitude_masks,
    prunable_weights,
    prune_magnitude_,
)


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(),
        nn.Linear(16, 4),
    )


def sparsity_of(weights):
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / sum(w.numel() for w in weights.values())


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("target", [0.3, 0.8, 0.95])
def test_one_shot_sparsity_is_exact(scope, target):
    model = tiny_cnn()
    prune_magnitude_(model, MagnitudePruneConfig(sparsity=target, scope=scope))
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    if scope == "layer":
        for w in weights.values():
            assert int((w == 0).sum()) == round(target * w.numel())
    else:
        assert int(sum((w == 0).sum() for w in weights.values())) == round(target * total)
    # biases are never pruned
    assert all((m.bias != 0).all() for m in model if isinstance(m, nn.Linear | nn.Conv2d))


def test_global_prunes_smallest_magnitudes():
    model = tiny_cnn()
    before = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    prune_magnitude_(model, MagnitudePruneConfig(sparsity=0.5))
    after = prunable_weights(model)
    kept = torch.cat([before[n][after[n] != 0].abs() for n in after])
    pruned = torch.cat([before[n][after[n] == 0].abs() for n in after])
    assert pruned.max() <= kept.min()


def test_ignore_leaves_layer_dense_and_unknown_name_errors():
    model = tiny_cnn()
    prune_magnitude_(model, MagnitudePruneConfig(sparsity=0.9, ignore=["5"]))
    assert (model[5].weight != 0).all()
    with pytest.raises(UnsupportedError, match="no module named 'fc9'"):
        prune_magnitude_(tiny_cnn(), MagnitudePruneConfig(sparsity=0.5, ignore=["fc9"]))


def test_agp_schedule_endpoints_and_monotonic():
    values = [agp_sparsity(0.9, t / 10) for t in range(11)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.9)
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def test_masks_cover_exact_count_with_ties():
    weights = {"a": torch.ones(10, 10), "b": torch.ones(5, 4)}
    masks = magnitude_masks(weights, 0.5, "global")
    assert sum(int((~m).sum()) for m in masks.values()) == 60


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        MagnitudePruneConfig(sparsity=1.5)
    with pytest.raises(ValueError, match="agp"):
        MagnitudePruneConfig(sparsity=0.5, schedule="agp")
