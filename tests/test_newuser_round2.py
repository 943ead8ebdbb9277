"""Regressions from a new user's architectures: an SE gate on an inception concat, a ConvNeXt
layer scale (a per-channel nn.Parameter), hand-written attention that derives head_dim."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from conftest import write_models_module
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.graph import Member, channel_groups
from lighten.prune.heads import HeadPruneConfig, prune_heads_
from lighten.prune.structured import (
    ChannelPruneConfig,
    apply_keep_,
    prunable_groups,
    prune_channels_,
)

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class InceptionSE(nn.Module):
        """Branches of widths 3 and 5 concatenated, then an SE gate over all 8 channels."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 5, 1)
            self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            return self.head((y * s).mean((2, 3)))


    class LayerScale(nn.Module):
        """ConvNeXt-style: a channels-last pointwise Linear scaled by gamma, plus a residual."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 8, 3, padding=1)
            self.pw = nn.Linear(8, 8)
            self.gamma = nn.Parameter(torch.linspace(0.5, 1.2, 8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x)
            y = self.gamma * self.pw(x.permute(0, 2, 3, 1))
            return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


    def inception_se():
        torch.manual_seed(0)
        return InceptionSE().eval()


    def layer_scale():
        torch.manual_seed(0)
        return LayerScale().eval()
''')
X = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_models_module(tmp_path_factory.mktemp("models"), "newuser_models", MODELS)


def test_se_gate_on_a_concat_cuts_the_gate_per_branch(zoo):
    model = zoo[1].inception_se()
    groups = {g.members[0].module: set(g.members) for g in channel_groups(model, X)}
    assert {Member("fc2", "out", 3), Member("fc1", "in", 3)} < groups["b"]
    assert {Member("fc2", "out", 0), Member("fc1", "in", 0)} < groups["a"]
    # removing channel 0 of each branch == zeroing concat channels 0 and 3 of the original
    prunable = prunable_groups(model, X)
    keeps = [torch.arange(1, g.size) if any(m.module == "fc2" for m in g.members)
             else torch.arange(g.size) for g in prunable]
    pruned = copy.deepcopy(model)
    apply_keep_(pruned, prunable, keeps)
    assert pruned.fc2.out_channels == 6 and pruned.fc1.in_channels == 6
    hook = model.a.register_forward_hook(lambda m, i, o: o.index_fill(1, torch.tensor([0]), -1))
    hook_b = model.b.register_forward_hook(lambda m, i, o: o.index_fill(1, torch.tensor([0]), -1))
    try:
        expected = model(X)  # relu(-1) = 0: the removed channels contribute nothing
    finally:
        hook.remove()
        hook_b.remove()
    torch.testing.assert_close(pruned(X), expected, atol=1e-6, rtol=0)


def test_layer_scale_parameter_is_sliced_with_its_channels(zoo, tmp_path):
    path, module = zoo
    model = module.layer_scale()
    with torch.no_grad():  # residual channel 5 carries nothing: l1 removes it first
        for t in (model.stem.weight, model.stem.bias, model.pw.weight, model.pw.bias):
            t[5] = 0
    reference = model(X)
    prune_channels_(model, ChannelPruneConfig(ratio=0.125, importance="l1"), X)
    assert model.gamma.shape == (7,) and model.pw.weight.shape == (7, 7)
    torch.testing.assert_close(model.gamma, torch.linspace(0.5, 1.2, 8)[[0, 1, 2, 3, 4, 6, 7]])
    torch.testing.assert_close(model(X), reference, atol=1e-6, rtol=0)
    file = tmp_path / "m.safetensors"
    spec = {"python": f"{path}:layer_scale", "input_shape": [2, 6, 6]}
    save_artifact(model, file, model_spec=spec, input_shape=[2, 6, 6], num_classes=3)
    loaded, manifest = load_artifact(file)
    assert [e for e in manifest["edits"] if e["op"] == "tensor"] == [
        {"op": "tensor", "path": "", "name": "gamma", "kind": "parameter", "shape": [7],
         "dtype": "float32"}]
    torch.testing.assert_close(loaded(X), reference, atol=1e-6, rtol=0)
    check = export_onnx(loaded, tmp_path / "m.onnx", input_shape=(2, 6, 6), sample_inputs=X)
    assert check.max_abs_diff < 1e-4


class WidthDerivedAttention(nn.Module):
    """head_dim = width // heads, as many hand-written ViTs do: head pruning breaks it."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_head_pruning_a_forward_that_breaks_is_one_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), WidthDerivedAttention(), nn.Flatten(),
                          nn.Linear(16 * 5, 3)).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedError, match=r"heads of \['1'\].*does not follow the head count"):
        prune_heads_(model, HeadPruneConfig(ratio=0.5), torch.randn(2, 5, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
