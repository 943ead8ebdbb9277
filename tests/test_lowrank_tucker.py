"""lowrank.tucker: Tucker-2 reconstructs a kernel of that multilinear rank exactly, truncation
stays within the HOSVD bound, the three layers compute the reconstructed conv (stride, padding,
dilation, bias, padding_mode), MACs match the formula, VBMF finds planted ranks, grouped convs
are left with a reason, and ResNet-20 at target_macs 0.5 reloads and runs on ONNX Runtime."""

from __future__ import annotations

import math

import pytest
import torch
from _lowrank_common import check_run, round_trip, run_tiny_recipe, runs_on_ort
from torch import nn
from torch.nn import functional as F

from lighten import compress
from lighten.data import DataSpec, load_data
from lighten.lowrank import TuckerConfig, factorize_tucker_, tucker2_layer
from lighten.lowrank.common import Site
from lighten.lowrank.ranks import evbmf_rank, singular_values, unfold
from lighten.lowrank.tucker import tucker_macs
from lighten.measure import count_macs
from lighten.models import ZOO

G = torch.Generator().manual_seed(0)

CNN_PY = '''
import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(self.dw(x)))
        return self.head(x.mean((2, 3)))


def cnn():
    return CNN()
'''


def _planted(out_c, in_c, k, r_out, r_in):
    core = torch.randn(r_out, r_in, k, k, generator=G)
    u_out = torch.linalg.qr(torch.randn(out_c, r_out, generator=G))[0]
    u_in = torch.linalg.qr(torch.randn(in_c, r_in, generator=G))[0]
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2),
                                dict(stride=1, padding=1, padding_mode="reflect"),
                                dict(stride=1, padding="same")])
def test_planted_multilinear_rank_reconstructs_exactly(kw):
    conv = nn.Conv2d(12, 10, 3, bias=True, **kw)
    conv.weight.data = _planted(10, 12, 3, 4, 5)
    module, error = tucker2_layer(conv, (4, 5))
    assert error <= 1e-6
    assert [m.kernel_size for m in module] == [(1, 1), (3, 3), (1, 1)]
    assert (module[0].out_channels, module[1].out_channels) == (5, 4)
    x = torch.randn(2, 12, 11, 11, generator=G)
    torch.testing.assert_close(module(x), conv(x), atol=1e-4, rtol=0)


def test_full_ranks_are_exact_and_need_no_pointwise_layers():
    conv = nn.Conv2d(6, 8, 3, padding=1)
    module, error = tucker2_layer(conv, (8, 6))
    assert error <= 1e-10 and len(module) == 1  # both factors fold into the core
    x = torch.randn(2, 6, 7, 7, generator=G)
    torch.testing.assert_close(module(x), conv(x), atol=1e-5, rtol=0)


def test_truncation_is_within_the_hosvd_bound_and_layers_compute_the_approximation():
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    w = conv.weight.detach()
    s0, s1 = singular_values(unfold(w, 0)), singular_values(unfold(w, 1))
    for r_out, r_in in ((6, 4), (12, 10), (20, 3)):
        module, error = tucker2_layer(conv, (r_out, r_in))
        bound = math.sqrt((s0[r_out:] ** 2).sum() + (s1[r_in:] ** 2).sum()) / w.norm().item()
        assert max((s0[r_out:] ** 2).sum(), (s1[r_in:] ** 2).sum()) ** 0.5 / w.norm().item() \
            <= error + 1e-6 <= bound + 1e-5
        # the three layers compute a conv with the reconstructed kernel, whose error is `error`
        kernel = torch.einsum("oa,abhw,bi->oihw", module[2].weight[:, :, 0, 0],
                              module[1].weight, module[0].weight[:, :, 0, 0])
        x = torch.randn(2, 16, 9, 9, generator=G)
        torch.testing.assert_close(module(x), F.conv2d(x, kernel, padding=1), atol=1e-4,
                                   rtol=0)
        assert ((kernel - w).norm() / w.norm()).item() == pytest.approx(error, abs=1e-5)


def test_macs_match_the_formula_and_fall():
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1)
    site = Site("c", conv, (32, 14, 14), (64, 7, 7))
    module, _ = tucker2_layer(conv, (16, 8))
    assert count_macs(module, (32, 14, 14)) == tucker_macs(site, (16, 8)) == (
        196 * 32 * 8 + 49 * (8 * 16 * 9 + 16 * 64))
    assert count_macs(conv, (32, 14, 14)) == tucker_macs(site, None) == 49 * 64 * 32 * 9


def test_vbmf_finds_planted_channel_ranks():
    w = _planted(48, 40, 3, 7, 5)
    w = w + 0.01 * w.std() * torch.randn(w.shape, generator=G)
    assert (evbmf_rank(unfold(w, 0)), evbmf_rank(unfold(w, 1))) == (7, 5)


def test_zoo_resnet20_at_half_the_macs_reloads_and_runs_on_ort(tmp_path):
    spec = {"zoo": "resnet20", "input_shape": [1, 16, 16]}
    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 16, 16)).eval()
    x = torch.randn(4, 1, 16, 16, generator=G)
    before = count_macs(model, (1, 16, 16))
    factorize_tucker_(model, TuckerConfig(target_macs=0.5, measure_latency=False), (x[:1],))
    after = count_macs(model, (1, 16, 16))
    assert 0.45 * before <= after <= 0.5 * before
    loaded, _ = round_trip(model, spec, 10, x, tmp_path / "t.safetensors")
    assert runs_on_ort(loaded, x, tmp_path / "t.onnx") < 1e-4


def test_recipe_on_a_python_model_leaves_grouped_convs_with_a_reason(tmp_path):
    result, out = run_tiny_recipe(tmp_path, "lowrank.tucker",
                                  "{ranks: [8, 4], measure_latency: false, "
                                  "finetune: {epochs: 0.5}}", CNN_PY, "cnn")
    base, final = result.rows
    assert final["macs"] < base["macs"]
    rows = {r["module"]: r for r in check_run(out, "lowrank.tucker")}
    assert rows["dw"]["action"] == "keep" and "groups=32" in rows["dw"]["reason"]
    assert rows["conv3"]["action"] == "factorize" and rows["conv3"]["rank"] == [8, 4]
    assert rows["conv3"]["macs_after"] < rows["conv3"]["macs_before"]


def test_compress_with_energy_and_a_latency_check():
    data = load_data(DataSpec(name="synthetic", samples=32, input_shape=[8, 12, 12],
                              num_classes=4))
    model = nn.Sequential(nn.Conv2d(8, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 4))
    out, report = compress(model, {"lowrank.tucker": {"energy": 0.6, "latency_batch": 8}},
                           data=data)
    row = next(r for r in report.layers if r["module"] == "2")
    assert row["ms_before"] > 0 and row["ms_after"] > 0
    assert isinstance(out[2], nn.Sequential) == (row["decision"] == "kept")


def test_composes_with_pruning_before_and_quantization_after():
    data = load_data(DataSpec(name="synthetic", samples=32, input_shape=[3, 8, 8],
                              num_classes=4))
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 4))
    pruned, _ = compress(model, {"prune.magnitude": {"sparsity": 0.5}}, data=data)
    tucker = {"lowrank.tucker": {"ranks": 8, "measure_latency": False}}
    low, report = compress(pruned, tucker, data=data)
    assert any("held pruned zeros" in n and "2" in n for n in report.notes)
    quantized, _ = compress(low, {"quant.ptq": {"calib_samples": 32}}, data=data)
    x = torch.randn(4, 3, 8, 8, generator=G)
    with torch.no_grad():
        agree = (quantized(x).argmax(1) == low(x).argmax(1)).float().mean().item()
    assert agree >= 0.5
