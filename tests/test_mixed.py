"""Mixed precision: budgets are met, sensitive layers get more bits, and it beats uniform 4-bit."""

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lighten.errors import UnsupportedError
from lighten.quant import PTQConfig, QuantLinear, quantize
from lighten.quant.mixed import MixedConfig, choose_bits, quantize_mixed_, weight_bytes

torch.set_num_threads(1)


class TwoBranch(nn.Module):
    """A small branch that decides the output and a large branch that barely contributes."""

    def __init__(self):
        super().__init__()
        self.small, self.small_head = nn.Linear(64, 8), nn.Linear(8, 5)
        self.big, self.big_head = nn.Linear(64, 96), nn.Linear(96, 5)

    def forward(self, x):
        out = self.small_head(torch.relu(self.small(x)))
        return out + 0.05 * self.big_head(torch.relu(self.big(x)))


def _inputs(n, seed, dim=64):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 0.01  # the feature the outlier weights of _outlier_pair read
    return x


def _rel_error(model, reference, x):
    with torch.no_grad():
        ref = reference(x)
        return float((model(x) - ref).pow(2).mean() / ref.pow(2).mean())


def _outlier_pair():
    """Two same-sized layers; the first has one huge weight per row (reading a near-constant
    input), so a coarse grid set by that weight rounds every other weight of the row to zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.normal_()
        model[0].weight[:, 0] = 40.0
        model[2].weight.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("metric", ["sqnr", "hessian"])
def test_sensitive_layer_gets_more_bits(metric):
    model = _outlier_pair()
    x = _inputs(128, 0, dim=32)
    notes = []
    cfg = MixedConfig(budget_bytes=5 / 32, metric=metric)  # room for one 8-bit + one 2-bit layer
    q, bits = quantize_mixed_(model, list(x.split(64)), cfg, notes=notes)
    assert bits == {"0": 8, "2": 2}
    assert q[0].weight_bits == 8 and q[2].weight_bits == 2
    assert int(q[2].weight_int.abs().max()) <= 1  # 2-bit symmetric codes
    assert any("bits 0=8, 2=2" in n for n in notes)


@pytest.mark.parametrize("budget", [0.07, 0.125, 0.15, 0.25])
def test_budget_is_met(budget):
    torch.manual_seed(0)
    model = TwoBranch().eval()
    numels = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    q, bits = quantize_mixed_(model, [_inputs(64, 0)], MixedConfig(budget_bytes=budget))
    used = sum(weight_bytes(numels[n], b) for n, b in bits.items())
    assert used <= budget * 4 * sum(numels.values())
    for name, b in bits.items():
        layer = q.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.weight_bits == b
        assert int(layer.weight_int.abs().max()) <= 2 ** (b - 1) - 1


def test_mixed_beats_uniform_4bit_at_its_byte_budget():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    calib, test = list(_inputs(256, 0).split(64)), _inputs(512, 1)
    names = ["small", "small_head", "big", "big_head"]
    uniform = quantize(copy.deepcopy(model), calib, PTQConfig(),
                       weight_bits=dict.fromkeys(names, 4))
    mixed, bits = quantize_mixed_(copy.deepcopy(model), calib, MixedConfig(budget_bytes=0.125))
    assert bits["big"] < 4 and bits["small"] == 8  # bytes move to where they matter
    assert _rel_error(mixed, model, test) < 0.5 * _rel_error(uniform, model, test)


def test_choose_bits_is_the_exact_optimum():
    sens = {"a": {2: 9.0, 4: 2.0, 8: 0.1}, "b": {2: 3.0, 4: 1.0, 8: 0.5},
            "c": {2: 1.0, 4: 0.9, 8: 0.8}}
    numels = {"a": 8, "b": 8, "c": 16}
    budget = weight_bytes(8, 8) + weight_bytes(8, 4) + weight_bytes(16, 2)  # 8 + 4 + 4 bytes
    best = min(((ba, bb, bc) for ba in (2, 4, 8) for bb in (2, 4, 8) for bc in (2, 4, 8)
                if weight_bytes(8, ba) + weight_bytes(8, bb) + weight_bytes(16, bc) <= budget),
               key=lambda t: sens["a"][t[0]] + sens["b"][t[1]] + sens["c"][t[2]])
    assert tuple(choose_bits(sens, numels, budget).values()) == best == (8, 4, 2)


def test_bad_budget_and_candidates():
    with pytest.raises(UnsupportedError, match="raise budget_bytes"):
        quantize_mixed_(_outlier_pair(), [_inputs(8, 0, dim=32)], MixedConfig(budget_bytes=0.03))
    with pytest.raises(ValidationError, match="candidate bit width 1"):
        MixedConfig(budget_bytes=0.1, candidates=[1, 4])
    with pytest.raises(ValidationError):
        MixedConfig(budget_bytes=1.5)


def test_step_notes_chosen_bits():
    from lighten.data import DataBundle
    from lighten.registry import get_step
    from lighten.step import StepContext

    x = _inputs(64, 0, dim=32)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(64, dtype=torch.int64))
    ctx = StepContext(data=DataBundle("tiny", ds, ds, (32,), 5), train_config=None,
                      baseline=None, workdir=None, progress=False)
    step = get_step("quant.mixed")
    q = step.apply(_outlier_pair(), MixedConfig(budget_bytes=5 / 32, calib_samples=64), ctx)
    assert q[0].weight_bits == 8 and any("quant.mixed (sqnr)" in n for n in ctx.notes)


def test_budget_in_whole_bytes_equals_the_same_fraction():
    model = _outlier_pair()
    calib = [_inputs(64, 0, dim=32)]
    numels = {n: m.weight.numel() for n, m in model.named_modules() if hasattr(m, "weight")}
    float_bytes = 4 * sum(numels.values())
    _, by_fraction = quantize_mixed_(copy.deepcopy(model), calib, MixedConfig(budget_bytes=0.2))
    _, by_bytes = quantize_mixed_(copy.deepcopy(model), calib,
                                  MixedConfig(budget_bytes=int(0.2 * float_bytes)))
    assert by_bytes == by_fraction
    with pytest.raises(ValidationError, match="whole number of bytes"):
        MixedConfig(budget_bytes=1.5)
