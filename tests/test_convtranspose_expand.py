"""Structured pruning through transposed convs (a U-Net decoder) and Tensor.expand (a ViT cls
token): the channel groups, importance on the right weight axis, surgery, artifact and ONNX."""

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
from lighten.measure import count_macs
from lighten.prune.importance import IMPORTANCE, accumulate_gradients, make_importance
from lighten.prune.structured import (
    ChannelPruneConfig,
    apply_keep_,
    prunable_groups,
    prune_channels_,
)
from lighten.prune.surgery import prune_module_

MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class TinyUNet(nn.Module):
        """Conv encoder, a strided ConvTranspose2d decoder, skip concat; per-pixel logits, or
        their mean (``pool``: what lighten's model loader expects of a classifier)."""

        def __init__(self, pool=False):
            super().__init__()
            self.pool = pool
            self.enc = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(12)
            self.up = nn.ConvTranspose2d(12, 6, 3, stride=2, padding=1, output_padding=1)
            self.up_bn = nn.BatchNorm2d(6)
            self.dec = nn.Conv2d(14, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            e = self.enc(x)
            b = F.relu(self.bn(self.down(e)))
            u = F.relu(self.up_bn(self.up(b)))
            y = self.head(F.relu(self.dec(torch.cat([u, e], 1))))
            return y.mean((2, 3)) if self.pool else y


    class TinyViT(nn.Module):
        """Patch embedding, a (1, 1, C) cls token expanded and concatenated on the token axis,
        a positional embedding, one MLP block, the head on token 0."""

        def __init__(self, c=8, norm=True):
            super().__init__()
            self.patch = nn.Conv2d(2, c, 2, stride=2)
            self.cls = nn.Parameter(torch.randn(1, 1, c))
            self.pos = nn.Parameter(torch.randn(1, 10, c) * 0.1)
            self.norm = nn.LayerNorm(c) if norm else nn.Identity()
            self.fc1, self.fc2 = nn.Linear(c, 16), nn.Linear(16, c)
            self.head = nn.Linear(c, 3)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
            t = t + self.fc2(F.gelu(self.fc1(self.norm(t))))
            return self.head(t[:, 0])


    def unet(pool=False):
        torch.manual_seed(0)
        model = TinyUNet(pool)
        for bn in (model.enc[1], model.bn, model.up_bn):  # non-trivial statistics
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        return model.eval()


    def unet_logits():
        return unet(pool=True)


    def vit(norm=True):
        torch.manual_seed(0)
        return TinyViT(norm=norm).eval()
''')
X = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_models_module(tmp_path_factory.mktemp("models"), "convt_models", MODELS)


def group_of(groups, member: Member):
    return next(g for g in groups if member in g.members)


def zeroed(model: nn.Module, where: dict[nn.Module, list[int]], x: torch.Tensor, fill=-1.0):
    """``model(x)`` with channels of some modules' outputs replaced by ``fill`` (-1 before a
    ReLU: the channel then contributes nothing, as when it is removed)."""
    hooks = [m.register_forward_hook(lambda _m, _i, o, c=c: o.index_fill(1, torch.tensor(c), fill))
             for m, c in where.items()]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def drop(groups, chosen: dict[Member, list[int]]) -> list[torch.Tensor]:
    """Keep indices per group: all but ``chosen[member]`` for the group holding that member."""
    keeps = []
    for g in groups:
        gone = next((c for m, c in chosen.items() if m in g.members), [])
        keeps.append(torch.tensor([i for i in range(g.size) if i not in gone]))
    return keeps


# ----------------------------------------------------------------------------- ConvTranspose


def test_unet_groups_take_transposed_axes(zoo):
    groups = channel_groups(zoo[1].unet(), X)
    down = group_of(groups, Member("down", "out"))
    assert Member("up", "in", transposed=True) in down.members and down.prunable
    up = group_of(groups, Member("up", "out", transposed=True))
    assert {Member("up_bn", "norm"), Member("dec", "in")} <= set(up.members) and up.prunable
    assert Member("dec", "in", 6) in group_of(groups, Member("enc.0", "out")).members
    assert Member("up", "out", transposed=True).axis == 1
    assert Member("up", "in", transposed=True).axis == 0


def test_unet_pruned_equals_zeroed_channels(zoo):
    model = zoo[1].unet()
    groups = prunable_groups(model, X)
    keeps = drop(groups, {Member("down", "out"): [1, 7], Member("up", "out", transposed=True): [0],
                          Member("enc.0", "out"): [3]})
    pruned = copy.deepcopy(model)
    apply_keep_(pruned, groups, keeps)
    up = pruned.up
    assert (up.in_channels, up.out_channels) == (10, 5)
    assert tuple(up.weight.shape) == (10, 5, 3, 3) and tuple(up.bias.shape) == (5,)
    assert pruned.dec.in_channels == 12 and pruned.up_bn.num_features == 5
    torch.testing.assert_close(up.weight, model.up.weight[[0, 2, 3, 4, 5, 6, 8, 9, 10, 11]][:, 1:])
    expected = zeroed(model, {model.bn: [1, 7], model.up_bn: [0], model.enc[1]: [3]}, X)
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [*IMPORTANCE, "random"])
def test_every_importance_prunes_a_unet(zoo, name):
    model = zoo[1].unet()
    batches = None
    if name == "taylor":
        y = torch.randint(0, 3, (4, 6, 6), generator=torch.Generator().manual_seed(2))
        batches = lambda: [(X, y)]  # noqa: E731 -- segmentation targets (N, H, W)
    macs = count_macs(model, (2, 6, 6))
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance=name), X, batches=batches)
    assert model.up.out_channels == 3 and model.up.in_channels == 6
    assert tuple(model.up.weight.shape) == (6, 3, 3, 3)
    assert count_macs(model, (2, 6, 6)) < 0.5 * macs
    with torch.no_grad():
        assert model(X).shape == (4, 3, 6, 6)


def test_importance_reads_the_transposed_output_axis(zoo):
    model = zoo[1].unet()
    with torch.no_grad():  # output channel 4 of the transposed conv carries nothing
        model.up.weight[:, 4] = 0
        model.up.bias[4] = 0
    group = group_of(prunable_groups(model, X), Member("up", "out", transposed=True))
    for name in ("l1", "l2"):
        scores = make_importance(name)(model, group)
        assert scores.shape == (6,) and scores[4] == 0 and (scores[[0, 1, 2, 3, 5]] > 0).all()
    torch.testing.assert_close(make_importance("l1")(model, group),
                               model.up.weight.detach().abs().sum((0, 2, 3)))
    y = torch.randint(0, 3, (4, 6, 6), generator=torch.Generator().manual_seed(2))
    accumulate_gradients(model, [(X, y)])
    w, b = model.up.weight, model.up.bias
    taylor = make_importance("taylor")(model, group)
    up_only = ((w * w.grad).sum((0, 2, 3)) + b * b.grad).detach()
    bn = model.up_bn
    rest = (bn.weight * bn.weight.grad + bn.bias * bn.bias.grad).detach()
    dec = model.dec.weight
    rest = rest + (dec * dec.grad).detach()[:, :6].sum((0, 2, 3))
    torch.testing.assert_close(taylor, (up_only + rest).pow(2))


def test_unet_artifact_and_onnx_round_trip(zoo, tmp_path):
    path, module = zoo
    model = module.unet_logits()
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance="l2"), X)
    with torch.no_grad():
        reference = model(X)
    file = tmp_path / "unet.safetensors"
    spec = {"python": f"{path}:unet_logits", "input_shape": [2, 6, 6]}
    save_artifact(model, file, model_spec=spec, input_shape=[2, 6, 6], num_classes=3)
    loaded, manifest = load_artifact(file)
    layers = {e["path"]: e for e in manifest["edits"] if e["op"] == "module"}
    assert layers["up"]["layer"] == "ConvTranspose2d"
    assert layers["up"]["attrs"]["output_padding"] == [1, 1]
    assert (loaded.up.in_channels, loaded.up.out_channels) == (6, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), reference, atol=1e-6, rtol=0)
    check = export_onnx(loaded, tmp_path / "unet.onnx", input_shape=(2, 6, 6), sample_inputs=X)
    assert check.max_abs_diff < 1e-4


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_transposed_conv_of_every_rank(dims, tmp_path):
    conv, convt = (getattr(nn, f"Conv{dims}d"), getattr(nn, f"ConvTranspose{dims}d"))
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 6, 3, padding=1), nn.ReLU(),
                          convt(6, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                          conv(4, 3, 1)).eval()
    x = torch.randn(2, 2, *(4,) * dims)
    groups = prunable_groups(model, x)
    pruned = copy.deepcopy(model)
    apply_keep_(pruned, groups, drop(groups, {Member("0", "out"): [1, 4],
                                              Member("2", "out", transposed=True): [2]}))
    assert (pruned[2].in_channels, pruned[2].out_channels) == (4, 3)
    expected = zeroed(model, {model[1]: [1, 4], model[3]: [2]}, x, fill=0.0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=0)
    file = tmp_path / "m.safetensors"
    save_artifact(pruned, file, model_spec={}, input_shape=list(x.shape[1:]), num_classes=3)
    loaded, _ = load_artifact(file, model=copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)
    check = export_onnx(loaded, tmp_path / "m.onnx", input_shape=tuple(x.shape[1:]),
                        sample_inputs=x)
    assert check.max_abs_diff < 1e-4


def test_depthwise_transposed_conv_is_pruned_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(6, 6, 2, stride=2, groups=6), nn.ReLU(),
                          nn.Conv2d(6, 3, 1)).eval()
    groups = prunable_groups(model, X)
    assert Member("2", "depthwise") in group_of(groups, Member("0", "out")).members
    pruned = copy.deepcopy(model)
    apply_keep_(pruned, groups, drop(groups, {Member("0", "out"): [0, 5]}))
    assert (pruned[2].in_channels, pruned[2].out_channels, pruned[2].groups) == (4, 4, 4)
    expected = zeroed(model, {model[3]: [0, 5]}, X, fill=0.0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), expected, atol=1e-5, rtol=0)


def test_grouped_transposed_conv_keeps_the_same_channels_per_group(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.ReLU(),
                          nn.Conv2d(6, 3, 1)).eval()
    groups = prunable_groups(model, X)
    into = group_of(groups, Member("0", "out"))
    assert into.size == 4 and {Member("0", "out", 4), Member("2", "in", 0, transposed=True),
                               Member("2", "in", 4, transposed=True)} <= set(into.members)
    out = group_of(groups, Member("2", "out", transposed=True))
    assert out.size == 3 and {Member("4", "in"), Member("4", "in", 3)} <= set(out.members)
    pruned = copy.deepcopy(model)
    apply_keep_(pruned, groups, drop(groups, {Member("0", "out"): [1],
                                              Member("2", "out", transposed=True): [0]}))
    up = pruned[2]
    assert (up.in_channels, up.out_channels, up.groups) == (6, 4, 2)
    assert tuple(up.weight.shape) == (6, 2, 2, 2)
    torch.testing.assert_close(up.bias, model[2].bias[[1, 2, 4, 5]])
    expected = zeroed(model, {model[1]: [1, 5], model[3]: [0, 3]}, X, fill=0.0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), expected, atol=1e-5, rtol=0)
    for name in ("l1", "taylor"):
        if name == "taylor":
            accumulate_gradients(model, [(X, torch.randint(0, 3, (4, 12, 12)))])
        assert make_importance(name)(model, out).shape == (3,)
    file = tmp_path / "m.safetensors"
    save_artifact(pruned, file, model_spec={}, input_shape=[2, 6, 6], num_classes=3)
    loaded, _ = load_artifact(file, model=copy.deepcopy(model))
    check = export_onnx(loaded, tmp_path / "m.onnx", input_shape=(2, 6, 6), sample_inputs=X)
    assert check.max_abs_diff < 1e-4


class Straddle(nn.Module):
    """Concatenated widths 2 + 4 cannot be cut into two groups of 3 tied channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 4, 1)
        self.up, self.head = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.cat([self.a(x), self.b(x)], 1))))


def test_grouped_transposed_conv_that_cannot_be_tied_is_kept_whole():
    groups = channel_groups(Straddle(), X)
    for member in (Member("b", "out"), Member("head", "in")):  # its input and its output
        assert any("grouped transposed conv 'up' (groups=2) is kept whole" in p
                   for p in group_of(groups, member).pinned)
    with pytest.raises(UnsupportedError, match="unequal groups"):
        prune_module_(Straddle().up, "in", torch.tensor([0]))


# ----------------------------------------------------------------------------- expand


def test_vit_cls_token_joins_the_channel_group(zoo):
    groups = channel_groups(zoo[1].vit(), X)
    group = group_of(groups, Member("patch", "out"))
    assert {Member("", "param:cls:2"), Member("", "param:pos:2"), Member("norm", "norm"),
            Member("fc1", "in"), Member("fc2", "out"), Member("head", "in")} <= set(group.members)
    assert group.prunable


def test_vit_pruned_equals_original_without_the_channel(zoo):
    model = zoo[1].vit(norm=False)
    with torch.no_grad():  # residual channel 5 carries nothing anywhere: l1 removes it first
        for t in (model.patch.weight, model.patch.bias, model.fc2.weight, model.fc2.bias):
            t[5] = 0
        model.cls[..., 5] = 0
        model.pos[..., 5] = 0
        reference = model(X)
    cls = model.cls.detach().clone()
    prune_channels_(model, ChannelPruneConfig(ratio=0.125, importance="l1"), X)
    assert model.cls.shape == (1, 1, 7) and model.pos.shape == (1, 10, 7)
    torch.testing.assert_close(model.cls, cls[..., [0, 1, 2, 3, 4, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference, atol=1e-6, rtol=0)


def test_vit_prune_artifact_and_onnx(zoo, tmp_path):
    path, module = zoo
    model = module.vit()
    macs = count_macs(model, (2, 6, 6))
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, importance="l2"), X)
    assert model.patch.out_channels == 4 and model.cls.shape == (1, 1, 4)
    assert model.norm.normalized_shape == (4,) and model.head.in_features == 4
    assert count_macs(model, (2, 6, 6)) < macs
    with torch.no_grad():
        reference = model(X)
    assert reference.shape == (4, 3)
    file = tmp_path / "vit.safetensors"
    spec = {"python": f"{path}:vit", "input_shape": [2, 6, 6]}
    save_artifact(model, file, model_spec=spec, input_shape=[2, 6, 6], num_classes=3)
    loaded, manifest = load_artifact(file)
    assert {(e["name"], tuple(e["shape"])) for e in manifest["edits"] if e["op"] == "tensor"} == {
        ("cls", (1, 1, 4)), ("pos", (1, 10, 4))}
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), reference, atol=1e-6, rtol=0)
    check = export_onnx(loaded, tmp_path / "vit.onnx", input_shape=(2, 6, 6), sample_inputs=X)
    assert check.max_abs_diff < 1e-4


class Gated(nn.Module):
    """A per-channel gate expanded over the image, a bias map expanded to x's shape."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.shift = nn.Parameter(torch.randn(8, 1, 1))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        g = torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        if self.how == "-1":
            g = g.expand(-1, -1, x.size(2), x.size(3))
        elif self.how == "as":
            g = g.expand_as(x)
        elif self.how == "literal":
            g = g.expand(x.size(0), 8, x.size(2), x.size(3))
        return self.head(x * g + self.shift.expand_as(x))


@pytest.mark.parametrize("how", ["-1", "as"])
def test_expand_keeping_the_channel_axis_is_followed(how):
    torch.manual_seed(0)
    model = Gated(how).eval()
    groups = prunable_groups(model, X)
    stem = group_of(groups, Member("stem", "out"))
    assert {Member("gate", "out"), Member("gate", "in"), Member("", "param:shift:0"),
            Member("head", "in")} <= set(stem.members)
    with torch.no_grad():  # channel 2 carries nothing: removing it changes nothing
        for t in (model.stem.weight, model.stem.bias, model.shift):
            t[2] = 0
        reference = model(X)
    prune_channels_(model, ChannelPruneConfig(ratio=0.125, importance="l1"), X)
    assert model.stem.out_channels == 7 and model.shift.shape == (7, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference, atol=1e-6, rtol=0)


def test_expand_that_hard_codes_channels_pins_them():
    groups = channel_groups(Gated("literal"), X)
    stem = group_of(groups, Member("stem", "out"))
    assert any("hard-codes 8 channels" in p for p in stem.pinned)


class Widen(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.one = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(2, 1, 1)

    def forward(self, x):
        return self.stem(x) * self.one(x).expand(-1, 8, -1, -1)


class ClsOnChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.extra = nn.Parameter(torch.zeros(1, 2, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([x, self.extra.expand(x.size(0), -1, x.size(2), x.size(3))], 1)


class ClsLiteral(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch, self.cls = nn.Conv2d(2, 8, 2, stride=2), nn.Parameter(torch.zeros(1, 1, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.size(0), 1, 8), t], 1)
        return self.head(t[..., :, 0, :])


def test_expand_refusals_and_pins():
    with pytest.raises(UnsupportedError, match=r"expand\(\) changes the channel axis"):
        channel_groups(Widen(), X)
    with pytest.raises(UnsupportedError, match="torch.cat adds the channels of 'extra'"):
        channel_groups(ClsOnChannels(), X)
    group = group_of(channel_groups(ClsLiteral(), X), Member("patch", "out"))
    assert any("hard-codes 8 channels" in p for p in group.pinned)


def test_indexing_the_channel_axis_is_still_refused():
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch, self.head = nn.Conv2d(2, 8, 2, stride=2), nn.Linear(9, 3)

        def forward(self, x):
            return self.head(self.patch(x).flatten(2).transpose(1, 2)[:, :, 0])

    with pytest.raises(UnsupportedError, match="may select channels"):
        channel_groups(Pick(), X)
