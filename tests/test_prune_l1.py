"""prune.l1: the penalty measurably shrinks weights / BN scales; thresholding is exact."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.prune.l1 import L1PruneConfig, bn_scales, prune_l1_
from lighten.prune.magnitude import prunable_weights

FT = {"epochs": 8, "lr": 2e-2}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def context(n=128):
    from lighten.data import DataBundle
    from lighten.step import StepContext
    from lighten.training import TrainConfig

    g = torch.Generator().manual_seed(1)
    protos = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = TensorDataset(protos[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g), y)
    return StepContext(data=DataBundle("tiny", ds, ds, (1, 8, 8), 4),
                       train_config=TrainConfig(batch_size=32), baseline=None, workdir=None,
                       progress=False)


def l1_mass(params):
    return sum(float(p.detach().abs().sum()) for p in params.values())


def test_penalty_drives_weights_to_zero_compared_with_lam_0():
    runs = {}
    for lam in (0.0, 1e-2):
        model = mlp()
        prune_l1_(model, L1PruneConfig(lam=lam, threshold=1e-2, finetune=FT), context())
        runs[lam] = prunable_weights(model)
    # same data, seed and schedule: only the penalty differs
    assert l1_mass(runs[1e-2]) < 0.6 * l1_mass(runs[0.0])
    zeros = {lam: sum(int((w == 0).sum()) for w in ws.values()) for lam, ws in runs.items()}
    assert zeros[1e-2] > 3 * max(zeros[0.0], 1)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_weights_target_reaches_exact_sparsity(sparsity):
    model = mlp()
    from lighten.registry import get_step

    ctx = context()
    get_step("prune.l1").apply(model, L1PruneConfig(lam=1e-4, sparsity=sparsity, finetune=FT),
                               ctx)
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((w == 0).sum()) for w in weights.values()) == round(sparsity * total)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    assert any("prune.l1: lam=0.0001" in n for n in ctx.notes)


def test_bn_target_shrinks_scales_and_zeroes_whole_channels():
    scales = {}
    for lam in (0.0, 0.1):
        model = mlp_bn = bn_cnn()
        prune_l1_(model, L1PruneConfig(lam=lam, target="bn", sparsity=0.25, finetune=FT),
                  context())
        scales[lam] = bn_scales(mlp_bn)
    # network slimming: the penalty shrinks the BN scales that survive too
    assert l1_mass(scales[0.1]) < 0.8 * l1_mass(scales[0.0])
    zeroed = [(name, c) for name, g in scales[0.1].items() for c in range(g.numel())
              if g[c] == 0]
    assert len(zeroed) == 4  # 25% of 16 channels
    modules = dict(mlp_bn.named_modules())
    assert all(modules[name].bias[c] == 0 for name, c in zeroed)  # shift zeroed with the scale
    with torch.no_grad():  # a zeroed channel outputs exactly zero after BN, as if removed
        mlp_bn.eval()
        name, c = zeroed[0]
        index = int(name)
        out = mlp_bn[: index + 1](torch.randn(3, 1, 8, 8))
        assert (out[:, c] == 0).all()
    # the conv weights themselves were not pruned
    assert all((w != 0).all() for w in prunable_weights(mlp_bn).values())


def test_config_errors():
    with pytest.raises(ValueError, match="finetune"):
        L1PruneConfig(lam=1e-4, sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        L1PruneConfig(lam=1e-4, finetune=FT)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        L1PruneConfig(lam=1e-4, sparsity=0.5, threshold=0.1, finetune=FT)
    with pytest.raises(ValueError):
        L1PruneConfig(lam=-1.0, sparsity=0.5, finetune=FT)


def test_bn_target_without_batchnorm_errors():
    from lighten.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="no.*BatchNorm|has none"):
        prune_l1_(mlp(), L1PruneConfig(lam=1e-4, target="bn", sparsity=0.5, finetune=FT),
                  context())
