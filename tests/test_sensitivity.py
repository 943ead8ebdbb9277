"""Sensitivity analysis: one row per layer and ratio, baseline at ratio 0, derived ratios."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.errors import UnsupportedError
from lighten.prune.magnitude import prunable_weights
from lighten.prune.sensitivity import SensitivityRow, SensitivityTable, analyze, derive_ratios


def trained_tiny():
    """A small MLP fitted for a few steps on separable synthetic data, so pruning costs accuracy."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    x = protos[y] + 0.8 * torch.randn(256, 1, 8, 8, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 4))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), TensorDataset(x, y)


def test_table_rows_baseline_and_model_restored(tmp_path):
    from lighten.training import evaluate

    model, data = trained_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = analyze(model, data, ratios=(0.0, 0.5, 0.95), eval_limit=200)
    assert table.layers == ["1", "3"] and table.eval_samples == 200
    assert len(table.rows) == 2 * 3
    assert {(r.layer, r.ratio) for r in table.rows} == {(la, ra) for la in ("1", "3")
                                                        for ra in (0.0, 0.5, 0.95)}
    for layer in table.layers:
        assert table.accuracy(layer, 0.0) == table.baseline
        assert table.accuracy(layer, 0.95) < table.baseline  # heavy pruning really hurts
    subset = torch.utils.data.Subset(data, range(200))
    assert table.baseline == evaluate(model, subset) > 0.8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    paths = table.write(tmp_path)
    assert len(paths["csv"].read_text().splitlines()) == 1 + 6
    assert "| 1 | 1536 |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def hand_table():
    """Layer a (1000 weights) barely cares; layer b (1000 weights) breaks early."""
    acc = {"a": [0.90, 0.90, 0.89, 0.88], "b": [0.85, 0.60, 0.30, 0.10]}
    ratios = (0.3, 0.5, 0.7, 0.9)
    rows = [SensitivityRow(layer, r, acc[layer][i]) for layer in acc
            for i, r in enumerate(ratios)]
    return SensitivityTable(0.90, rows, {"a": 1000, "b": 1000}, ratios=ratios)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.6, 0.8])
def test_derive_ratios_meets_target_and_spares_sensitive_layer(target):
    table = hand_table()
    ratios = derive_ratios(table, target)
    overall = sum(ratios[n] * s for n, s in table.layer_sizes.items()) / 2000
    assert overall == pytest.approx(target, abs=1e-9)
    assert ratios["a"] >= ratios["b"] and all(0 <= r <= 0.9 for r in ratios.values())
    if target <= 0.45:  # a alone (up to 0.9) can carry it
        assert ratios["b"] == pytest.approx(0.0, abs=1e-6)


def test_derive_ratios_limits():
    table = hand_table()
    with pytest.raises(UnsupportedError, match="out of reach"):
        derive_ratios(table, 0.95)  # both layers at 0.9 give only 0.9
    # b may lose at most 2.5 points: linear between (0, 0) and (0.3, 5 points) caps it at 0.15
    capped = derive_ratios(table, 0.45, max_drop=0.025)
    assert capped["a"] + capped["b"] == pytest.approx(0.9)
    assert 0 <= capped["b"] <= 0.15 + 1e-9 and capped["a"] > 0.7
    assert derive_ratios(table, 0.525, max_drop=0.025)["b"] == pytest.approx(0.15)
    with pytest.raises(UnsupportedError, match="out of reach"):
        derive_ratios(table, 0.55, max_drop=0.025)


def test_analyze_rejects_bad_input():
    model, data = trained_tiny()
    with pytest.raises(UnsupportedError, match="kind 'fpgm' is unknown"):
        analyze(model, data, kind="fpgm")
    with pytest.raises(UnsupportedError, match="fractions in"):
        analyze(model, data, ratios=(0.5, 1.0))


def test_cli_analyze_writes_table_plot_and_ratios(tmp_path, capsys):
    from lighten.cli.main import main

    out = tmp_path / "an"
    rc = main(["analyze", "lenet300", "--sensitivity", "--data", "synthetic", "--limit", "32",
               "--ratios", "0,0.5", "--target-sparsity", "0.4", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| layer | params | 0 | 0.5 |" in text
    ratios = json.loads((out / "ratios.json").read_text())
    from lighten.models import ZOO

    layers = prunable_weights(ZOO["lenet300"]())
    assert set(ratios) == set(layers)
    overall = sum(ratios[n] * w.numel() for n, w in layers.items()) / sum(
        w.numel() for w in layers.values())
    assert overall == pytest.approx(0.4, abs=1e-3)  # ratios.json rounds to 4 decimals
    assert (out / "sensitivity.png").stat().st_size > 1000
    assert main(["analyze", "lenet300", "--data", "synthetic"]) == 2
    assert "add --sensitivity" in capsys.readouterr().err
