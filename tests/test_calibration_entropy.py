"""Entropy (KL) calibration: clips rare outliers, keeps flat ranges, histograms that grow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lighten.errors import UnsupportedError
from lighten.quant.modules import activation_spec
from lighten.quant.observers import (
    EntropyObserver,
    MinMaxObserver,
    make_observer,
    quantization_mse,
)
from lighten.quant.ptq import PTQConfig, quantize_ptq_
from lighten.quant.quantizer import sqnr_db

U8 = activation_spec(8, signed=False)


def observe_all(batches, *observers):
    for x in batches:
        for obs in observers:
            obs.observe(x)


def relu_batches_with_outliers(seed=0, n=5):
    """|N(0,1)| activations; every batch has two values 100-300x the bulk."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        bulk = torch.randn(20000, generator=g).abs()
        out.append(torch.cat([bulk, torch.tensor([100.0 + 50 * i, 300.0])]))
    return out


def test_clips_rare_outliers_and_beats_minmax_on_the_bulk():
    batches = relu_batches_with_outliers()
    ent, mm = EntropyObserver(U8), MinMaxObserver()
    observe_all(batches, ent, mm)
    lo, hi = ent.range()
    assert lo == 0.0  # non-negative data: the uint8 range starts at 0
    assert hi < 0.2 * mm.range()[1]  # range << max
    bulk = torch.cat([b[:-2] for b in batches])
    assert quantization_mse(bulk, (lo, hi), U8) < 0.05 * quantization_mse(bulk, mm.range(), U8)


def test_signed_outliers_are_clipped_on_each_side():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(50000, generator=g), torch.tensor([-400.0, 90.0])])
    ent = EntropyObserver(U8)
    ent.observe(x)
    lo, hi = ent.range()
    assert -60 < lo < -2 and 2 < hi < 60
    bulk = x[:-2]
    assert quantization_mse(bulk, (lo, hi), U8) < 0.1 * quantization_mse(
        bulk, (float(x.min()), float(x.max())), U8)


@pytest.mark.parametrize("bits", [8, 6])
def test_uniform_data_keeps_about_the_full_range(bits):
    g = torch.Generator().manual_seed(2)
    ent = EntropyObserver(activation_spec(bits, signed=False))
    observe_all([3 * torch.rand(20000, generator=g) for _ in range(4)], ent)
    lo, hi = ent.range()
    assert lo == 0.0 and 0.97 * 3 < hi <= 3.0 * 1.002


def grid_values(n: int, top: float, bins: int = 2048, seed: int = 0) -> torch.Tensor:
    """Values at bin centres of a histogram over [0, top]: no float ties at bin edges."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(bins, (n,), generator=g).double()
    return ((idx + 0.5) * top / bins).float()


def test_histogram_regrows_exactly_across_batches():
    first = grid_values(5000, 1.0)
    first[0] = 1.0  # sets the first radius to exactly 1
    later = 3.0 * grid_values(5000, 1.0, seed=1)  # needs radius 4: bins merge 4 to 1
    ent = EntropyObserver(U8)
    ent.observe(first)
    ent.observe(later)
    assert ent.radius == 4.0 and not ent.signed
    expected = torch.histc(torch.cat([first[1:], later]), 2048, 0.0, 4.0).double()
    expected[511] += 1  # the first radius itself was counted in the last bin of [0, 1]
    assert torch.equal(ent.hist, expected)
    assert float(ent.hist.sum()) == 10000


def test_histogram_turns_two_sided_on_the_first_negative_value():
    first = grid_values(5000, 2.0)
    first[0] = 2.0
    later = -grid_values(3000, 2.0, seed=3)
    ent = EntropyObserver(U8)
    ent.observe(first)
    ent.observe(later)
    assert ent.signed and ent.radius == 2.0
    expected = torch.histc(torch.cat([first, later]), 2048, -2.0, 2.0).double()
    assert float(ent.hist.sum()) == 8000
    assert torch.equal(ent.hist, expected)


def test_edge_cases_and_factory():
    obs = make_observer("entropy", spec=activation_spec(6, signed=False))
    assert isinstance(obs, EntropyObserver) and obs.levels == 63
    with pytest.raises(UnsupportedError, match="saw no data"):
        obs.range()
    obs.observe(torch.zeros(10))
    assert obs.range() == (0.0, 0.0)
    with pytest.raises(UnsupportedError, match="entropy"):
        make_observer("kl")


def test_ptq_with_entropy_calibration_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from lighten.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 10)).eval()
    calib = torch.randn(128, 1, 8, 8)
    q = quantize_ptq_(copy.deepcopy(model), calib.split(32), PTQConfig(calibration="entropy"))
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 20
    check = export_onnx(q, tmp_path / "m.onnx", input_shape=(1, 8, 8), sample_inputs=x)
    assert check.quantized and check.agreement == 1.0
