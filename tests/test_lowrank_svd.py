"""lowrank.svd: exact at full rank, truncation error = the discarded singular values, MACs fall by
r (in + out) / (in out), EVBMF finds a planted rank, artifacts reload, ONNX Runtime runs it, and
it works from a recipe, from lighten.compress, on a zoo model and on a python: model."""

from __future__ import annotations

import math

import pytest
import torch
from _lowrank_common import check_run, round_trip, run_tiny_recipe, runs_on_ort
from torch import nn

from lighten import compress
from lighten.data import DataSpec, load_data
from lighten.errors import RecipeError, UnsupportedError
from lighten.lowrank import SVDConfig, evbmf_rank, factorize_svd_, svd_layer
from lighten.lowrank.ranks import energy_rank
from lighten.measure import count_macs
from lighten.models import ZOO

G = torch.Generator().manual_seed(0)

MLP_PY = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 32)
        self.proj = nn.Conv2d(1, 1, 1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.proj(x).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp():
    return MLP()
'''


def test_full_rank_is_exact_for_linear_and_pointwise_conv():
    lin = nn.Linear(20, 12)
    x = torch.randn(5, 20, generator=G)
    pair = svd_layer(lin, 12)
    assert [type(m) for m in pair] == [nn.Linear, nn.Linear] and pair[0].out_features == 12
    torch.testing.assert_close(pair(x), lin(x), atol=1e-4, rtol=0)

    conv = nn.Conv2d(10, 7, 1, stride=2, padding=1)
    xi = torch.randn(2, 10, 9, 9, generator=G)
    pair = svd_layer(conv, 7)
    assert pair(xi).shape == conv(xi).shape == (2, 7, 6, 6)
    torch.testing.assert_close(pair(xi), conv(xi), atol=1e-4, rtol=0)


def test_truncation_error_is_the_discarded_singular_values():
    lin = nn.Linear(40, 30, bias=False)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    for rank in (1, 5, 17):
        pair = svd_layer(lin, rank)
        approx = (pair[1].weight @ pair[0].weight).double()
        error = torch.linalg.norm(approx - lin.weight.detach().double())
        assert error.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-4)
    # energy e keeps r singular values and bounds the relative error by sqrt(1 - e)
    for energy in (0.5, 0.9, 0.99):
        rank = energy_rank(s.numpy(), energy)
        assert s[:rank].square().sum() / s.square().sum() >= energy - 1e-9
        assert s[:rank - 1].square().sum() / s.square().sum() < energy
        pair = svd_layer(lin, rank)
        rel = torch.linalg.norm((pair[1].weight @ pair[0].weight) - lin.weight) / torch.linalg.norm(
            lin.weight)
        assert rel.item() <= math.sqrt(1 - energy) + 1e-5


def test_macs_drop_by_the_stated_factor():
    lin = nn.Linear(96, 64)
    for rank in (4, 16, 32):
        pair = svd_layer(lin, rank)
        assert count_macs(pair, (96,)) == rank * (96 + 64)
        assert count_macs(pair, (96,)) / count_macs(lin, (96,)) == pytest.approx(
            rank * (96 + 64) / (96 * 64))
    conv = nn.Conv2d(32, 48, 1)
    pair = svd_layer(conv, 8)
    assert count_macs(pair, (32, 7, 7)) == 49 * 8 * (32 + 48)
    assert count_macs(conv, (32, 7, 7)) == 49 * 32 * 48


def test_evbmf_finds_a_planted_rank():
    for rows, cols, rank in ((64, 300, 6), (40, 40, 3), (120, 50, 9)):
        signal = torch.randn(rows, rank, generator=G) @ torch.randn(rank, cols, generator=G)
        noisy = signal + 0.1 * torch.randn(rows, cols, generator=G)
        assert evbmf_rank(noisy) == rank
    assert evbmf_rank(torch.randn(50, 80, generator=G)) == 1  # pure noise: nothing (>= 1)


def test_only_layers_whose_macs_fall_are_replaced_and_rows_say_why():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    out = factorize_svd_(model, SVDConfig(rank=20, measure_latency=False), (torch.zeros(1, 64),))
    assert isinstance(out[1], nn.Sequential) and out[1][0].out_features == 20  # 20*128 < 4096
    assert isinstance(out[3], nn.Linear)  # rank min(20, 4) = 4: 4*68 > 256, no MAC saving


def test_zoo_lenet300_target_macs_reloads_and_runs_on_ort(tmp_path):
    spec = {"zoo": "lenet300", "input_shape": [1, 28, 28]}
    model = ZOO["lenet300"](num_classes=10, input_shape=(1, 28, 28)).eval()
    x = torch.randn(8, 1, 28, 28, generator=G)
    before = count_macs(model, (1, 28, 28))
    factorize_svd_(model, SVDConfig(target_macs=0.5, measure_latency=False), (x[:1],))
    after = count_macs(model, (1, 28, 28))
    assert 0.4 * before <= after <= 0.5 * before
    loaded, manifest = round_trip(model, spec, 10, x, tmp_path / "svd.safetensors")
    assert any(e.get("layer") == "Sequential" for e in manifest["edits"])
    assert runs_on_ort(loaded, x, tmp_path / "svd.onnx") < 1e-4


def test_compress_with_latency_check_reports_each_decision():
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8],
                              num_classes=4))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    out, report = compress(model, {"lowrank.svd": {"rank": 8, "latency_batch": 16}}, data=data)
    rows = {r["module"]: r for r in report.layers}
    row = rows["1"]
    assert row["ms_before"] > 0 and row["ms_after"] > 0 and row["macs_after"] < row["macs_before"]
    assert row["decision"] in ("kept", "reverted")
    assert isinstance(out[1], nn.Sequential) == (row["decision"] == "kept")
    assert row["action"] == ("factorize" if row["decision"] == "kept" else "keep")
    assert isinstance(model[1], nn.Linear)  # the caller's model is untouched


def test_runs_from_a_recipe_on_a_python_model(tmp_path):
    result, out = run_tiny_recipe(tmp_path, "lowrank.svd",
                                  "{energy: 0.8, measure_latency: false}", MLP_PY, "mlp")
    base, final = result.rows
    assert final["macs"] < base["macs"]
    rows = check_run(out, "lowrank.svd")
    assert {r["module"] for r in rows} >= {"fc1", "fc2"}
    assert all(r["error"] <= math.sqrt(1 - 0.8) + 1e-4 for r in rows)


def test_bad_configs_say_what_to_do():
    with pytest.raises(RecipeError, match="give one of rank, energy, target_macs"):
        compress(nn.Linear(4, 4), {"lowrank.svd": {"rank": 2, "energy": 0.9}})
    data = load_data(DataSpec(name="synthetic", samples=16, input_shape=[1, 8, 8],
                              num_classes=4))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(UnsupportedError, match="ignore: no module named 'fc9'"):
        compress(model, {"lowrank.svd": {"ignore": ["fc9"], "measure_latency": False}},
                 data=data)
