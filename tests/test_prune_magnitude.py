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


# ---------------------------------------------------------------- per-layer ratios, rewinding


def _context(n=96):
    from torch.utils.data import TensorDataset

    from lighten.data import DataBundle
    from lighten.step import StepContext
    from lighten.training import TrainConfig

    g = torch.Generator().manual_seed(1)
    protos = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = TensorDataset(protos[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g), y)
    return StepContext(data=DataBundle("tiny", ds, ds, (1, 8, 8), 4),
                       train_config=TrainConfig(lr=1e-2, batch_size=32), baseline=None,
                       workdir=None, progress=False)


def test_ratio_mapping_is_exact_per_layer_and_default_applies():
    model = tiny_cnn()
    prune_magnitude_(model, MagnitudePruneConfig(sparsity=0.5, ratios={"0": 0.25, "5": 0.75}))
    for name, ratio in {"0": 0.25, "3": 0.5, "5": 0.75}.items():
        w = prunable_weights(model)[name]
        assert int((w == 0).sum()) == round(ratio * w.numel()), name
    model = tiny_cnn()  # without sparsity, layers not named stay dense
    prune_magnitude_(model, MagnitudePruneConfig(ratios={"3": 0.9}))
    assert (model[0].weight != 0).all() and (model[5].weight != 0).all()
    assert int((model[3].weight == 0).sum()) == round(0.9 * model[3].weight.numel())


def test_ratio_errors():
    with pytest.raises(UnsupportedError, match="'fc' is not a prunable layer"):
        prune_magnitude_(tiny_cnn(), MagnitudePruneConfig(ratios={"fc": 0.5}))
    with pytest.raises(ValueError, match="sparsity is required"):
        MagnitudePruneConfig(ratios="auto")
    with pytest.raises(ValueError, match="not a fraction"):
        MagnitudePruneConfig(ratios={"0": 1.0})
    with pytest.raises(ValueError, match="rewind"):
        MagnitudePruneConfig(sparsity=0.5, rewind=True)


def test_auto_ratios_meet_overall_sparsity_non_uniformly():
    model, ctx = tiny_cnn(), _context()
    cfg = MagnitudePruneConfig(sparsity=0.6, ratios="auto", auto_samples=64)
    prune_magnitude_(model, cfg, ctx)
    weights = prunable_weights(model)
    zeros = {n: int((w == 0).sum()) / w.numel() for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    overall = sum(int((w == 0).sum()) for w in weights.values()) / total
    assert overall == pytest.approx(0.6, abs=len(weights) / total)  # per-layer rounding only
    assert max(zeros.values()) - min(zeros.values()) > 0.05  # really non-uniform
    assert any("ratios from sensitivity on 64 training samples" in n for n in ctx.notes)


def test_rewind_retrains_from_finetune_start_with_final_mask():
    from lighten.prune.magnitude import KeepMasks

    ft = {"epochs": 1, "lr": 1e-2}
    agp = MagnitudePruneConfig(sparsity=0.8, schedule="agp", finetune=ft)
    plain = prune_magnitude_(tiny_cnn(), agp, _context())
    rewound = prune_magnitude_(tiny_cnn(), agp.model_copy(update={"rewind": True}), _context())
    final_masks = {n: w != 0 for n, w in prunable_weights(plain).items()}
    # reference: the original weights with the final mask, fine-tuned once with it fixed
    reference = tiny_cnn()
    weights = prunable_weights(reference)
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(final_masks[name])
    _context().finetune(reference, agp.finetune, callbacks=[KeepMasks(weights, final_masks)])
    for name, w in prunable_weights(rewound).items():
        assert torch.equal(w != 0, final_masks[name])
        assert torch.allclose(w, weights[name], atol=1e-6)
    assert not torch.allclose(prunable_weights(plain)["3"], prunable_weights(rewound)["3"])
