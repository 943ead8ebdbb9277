"""lowrank.cp: a kernel of CP rank R reconstructs at rank R, the four layers compute the conv with
the reconstructed kernel (stride, padding, dilation, bias), MACs match the formula, rank: auto
meets its error target below the break-even rank, artifacts reload, ONNX Runtime runs it, and it
runs from a recipe on a python: model and through lighten.compress on LeNet-5."""

from __future__ import annotations

import pytest
import torch
from _lowrank_common import check_run, round_trip, run_tiny_recipe, runs_on_ort
from torch import nn
from torch.nn import functional as F

from lighten import compress
from lighten.data import DataSpec, load_data
from lighten.lowrank import CPConfig, cp_layer
from lighten.lowrank.common import Site
from lighten.lowrank.cp import break_even_rank, cp_macs
from lighten.measure import count_macs

G = torch.Generator().manual_seed(0)

CNN_PY = '''
import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def cnn():
    return CNN()
'''


def _cp_kernel(out_c, in_c, kh, kw, rank):
    a, b = torch.randn(out_c, rank, generator=G), torch.randn(in_c, rank, generator=G)
    c, d = torch.randn(kh, rank, generator=G), torch.randn(kw, rank, generator=G)
    return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d)


def _kernel(module: nn.Sequential) -> torch.Tensor:
    """The conv kernel the four layers compute: sum_r a_r (x) b_r (x) c_r (x) d_r."""
    first, vertical, horizontal, last = module
    return torch.einsum("or,ri,rh,rw->oihw", last.weight[:, :, 0, 0], first.weight[:, :, 0, 0],
                        vertical.weight[:, 0, :, 0], horizontal.weight[:, 0, 0, :])


@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=(2, 1), padding=(2, 0),
                                                                 dilation=(2, 1))])
def test_planted_cp_rank_reconstructs_and_layers_compute_it(kw):
    conv = nn.Conv2d(8, 10, 3, bias=True, **kw)
    conv.weight.data = _cp_kernel(10, 8, 3, 3, 4)
    module, error = cp_layer(conv, 4, iterations=500)
    assert error <= 1e-4
    x = torch.randn(2, 8, 11, 11, generator=G)
    assert module(x).shape == conv(x).shape
    torch.testing.assert_close(module(x), conv(x), atol=1e-4 * conv(x).abs().max().item(),
                               rtol=0)
    # truncated: the layers compute exactly the conv with the CP kernel, whose error is `error`
    conv.weight.data = torch.randn(10, 8, 3, 3, generator=G)
    module, error = cp_layer(conv, 6)
    kernel = _kernel(module)
    want = F.conv2d(x, kernel, conv.bias, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation)
    torch.testing.assert_close(module(x), want, atol=1e-4, rtol=0)
    assert ((kernel - conv.weight).norm() / conv.weight.norm()).item() == pytest.approx(
        error, abs=1e-5)
    assert 0 < error < 1


def test_macs_match_the_formula_and_break_even():
    conv = nn.Conv2d(32, 64, 3, stride=2, padding=1)
    site = Site("c", conv, (32, 14, 14), (64, 7, 7))
    module, _ = cp_layer(conv, 12, iterations=5)
    assert count_macs(module, (32, 14, 14)) == cp_macs(site, 12) == 12 * (
        196 * 32 + 7 * 14 * 3 + 49 * 3 + 49 * 64)
    top = break_even_rank(site)
    assert cp_macs(site, top) < cp_macs(site, None) <= cp_macs(site, top + 1)


def test_auto_rank_meets_the_error_target_on_lenet5_and_reloads(tmp_path):
    from lighten.models import ZOO

    data = load_data(DataSpec(name="synthetic", samples=32, input_shape=[1, 28, 28],
                              num_classes=10))
    model = ZOO["lenet5"](num_classes=10, input_shape=(1, 28, 28))
    out, report = compress(model, CPConfig(max_error=0.4, measure_latency=False,
                                           iterations=50), data=data)
    rows = [r for r in report.layers if r["action"] == "factorize"]
    assert rows, report.layers
    for row in rows:
        assert row["error"] <= 0.4 and row["macs_after"] < row["macs_before"]
    x = torch.randn(4, 1, 28, 28, generator=G)
    loaded, _ = round_trip(out, {"zoo": "lenet5", "input_shape": [1, 28, 28]}, 10, x,
                           tmp_path / "cp.safetensors")
    assert runs_on_ort(loaded, x, tmp_path / "cp.onnx") < 1e-4


def test_recipe_on_a_python_model(tmp_path):
    result, out = run_tiny_recipe(tmp_path, "lowrank.cp", "{rank: 8, measure_latency: false}",
                                  CNN_PY, "cnn")
    base, final = result.rows
    assert final["macs"] < base["macs"]
    rows = {r["module"]: r for r in check_run(out, "lowrank.cp")}
    assert rows["conv2"]["action"] == "factorize" and rows["conv2"]["rank"] == 8
    assert rows["conv1"]["action"] == "keep"  # 1 input channel: rank 8 saves no MACs
