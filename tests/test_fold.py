"""BN folding: the folded model computes what the unfolded one did (eval mode)."""

import copy

import pytest
import torch
from torch import nn

from lighten.arch.fold import fold_batchnorm, fold_batchnorm_report


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def _assert_same(ref: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        a, b = ref(x), folded(x)
    rel = (a - b).abs().max() / a.abs().max()
    assert rel < 1e-5, f"relative error {rel:.2e}"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.short = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + self.short(x))
        return self.fc(out.mean(dim=(2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        y = self.body(x)
        return y * 2 if y.sum() > 0 else y


def test_sequential_conv_and_linear_bn_fold():
    model = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 6 * 6, 10), nn.BatchNorm1d(10, affine=False), nn.Linear(10, 3)))
    ref = copy.deepcopy(model)
    report = fold_batchnorm_report(model)
    assert report.method == "fx"
    assert report.folded == [("0", "1"), ("4", "5")]
    assert isinstance(model[1], nn.Identity) and isinstance(model[5], nn.Identity)
    _assert_same(ref, model, torch.randn(16, 3, 8, 8))


def test_residual_model_folds_all_pairs_and_adds_bias():
    model = _randomize_bn(Residual())
    ref = copy.deepcopy(model)
    out = fold_batchnorm(model)
    assert out is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.conv1.bias is not None  # created by the fold
    _assert_same(ref, model, torch.randn(8, 3, 10, 10))


def test_untraceable_model_falls_back_to_sequential_pairs():
    model = _randomize_bn(Untraceable())
    ref = copy.deepcopy(model)
    report = fold_batchnorm_report(model)
    assert report.method == "sequential"
    assert report.trace_error
    assert report.folded == [("body.0", "body.1")]
    _assert_same(ref, model, torch.randn(4, 3, 8, 8))


def test_conv_output_used_twice_is_not_folded():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _randomize_bn(TwoUses())
    ref = copy.deepcopy(model)
    report = fold_batchnorm_report(model)
    assert report.folded == []
    assert report.skipped and report.skipped[0][0] == "bn"
    assert isinstance(model.bn, nn.BatchNorm2d)
    _assert_same(ref, model, torch.randn(2, 2, 5, 5))


@pytest.mark.parametrize("dtype", [torch.float32])
def test_fold_keeps_dtype(dtype):
    model = _randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    fold_batchnorm(model)
    assert model[0].weight.dtype == dtype and model[0].bias.dtype == dtype
