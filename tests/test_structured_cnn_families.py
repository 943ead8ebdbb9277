"""prune.channels on CNN families beyond plain conv stacks, each defined small here:

* ConvNeXt: depthwise 7x7 conv, permute to channels-last, LayerNorm, Linear(C, 4C), GELU,
  Linear(4C, C), a layer-scale parameter, permute back, residual add; the stem and downsampling
  norms written as ConvNeXt's own channels-first LayerNorm (statistics over the channel axis),
  as a LayerNorm2d (an nn.LayerNorm subclass: permute, F.layer_norm, permute back) or as an
  nn.LayerNorm between permutes;
* stochastic depth: a drop_path function kept whole by ``torch.fx.wrap`` (probed: channels pass
  through) or traced through (timm's, in training mode: ``x.new_empty(...).bernoulli_()``);
* ShuffleNetV2: ``x1, x2 = x.chunk(2, dim=1)``, a branch on x2, ``cat((x1, branch(x2)), 1)``,
  channel shuffle by view/transpose/view; the stride-2 unit with two branches.

Each: forward works, MACs and params fall, a model pruned at ratio 0 gives the same outputs,
the pruned model equals the original with the removed channels zeroed where that is exact, and
the pruned model reloads from an artifact that names its ``python:`` factory.
"""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from conftest import write_models_module
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.graph import channel_groups
from lighten.layers import LAYER_SPECS, LayerSpec, register_layer_spec
from lighten.measure import count_macs, count_params
from lighten.prune.structured import (
    ChannelPruneConfig,
    apply_keep_,
    prunable_groups,
    prune_channels_,
)

MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    def drop_path(x, p: float = 0.0, training: bool = False):
        """Stochastic depth: drop whole samples of a residual branch."""
        if p == 0.0 or not training:
            return x
        keep = 1 - p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


    torch.fx.wrap("drop_path")  # a leaf for tracers: one call in the graph


    class DropPath(nn.Module):
        def __init__(self, p=0.0):
            super().__init__()
            self.p = p

        def forward(self, x):
            return drop_path(x, self.p, self.training)


    def timm_drop_path(x, drop_prob: float = 0.0, training: bool = False):
        """timm's drop_path, not wrapped: traced through in training mode."""
        if drop_prob == 0.0 or not training:
            return x
        keep_prob = 1 - drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        random_tensor.div_(keep_prob)
        return x * random_tensor


    class TimmDropPath(DropPath):
        def forward(self, x):
            return timm_drop_path(x, self.p, self.training)


    class LayerNormCF(nn.Module):
        """ConvNeXt's own LayerNorm for channels-first tensors."""

        def __init__(self, c, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(c))
            self.bias = nn.Parameter(torch.zeros(c))
            self.eps = eps

        def forward(self, x):
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]


    class LayerNorm2d(nn.LayerNorm):
        """torchvision / timm: permute to channels-last, F.layer_norm, permute back."""

        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)


    class PermutedLayerNorm(nn.Module):
        """An nn.LayerNorm between permutes, as a block of its own."""

        def __init__(self, c):
            super().__init__()
            self.norm = nn.LayerNorm(c, eps=1e-6)

        def forward(self, x):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


    NORMS = {"cf": LayerNormCF, "ln2d": LayerNorm2d, "permute": PermutedLayerNorm}
    DROPS = {"wrap": DropPath, "timm": TimmDropPath}


    class Block(nn.Module):
        def __init__(self, dim, drop_cls=DropPath, p=0.1):
            super().__init__()
            self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.pwconv1 = nn.Linear(dim, 4 * dim)
            self.act = nn.GELU()
            self.pwconv2 = nn.Linear(4 * dim, dim)
            self.gamma = nn.Parameter(torch.rand(dim) + 0.5)  # layer scale
            self.drop_path = drop_cls(p)

        def forward(self, x):
            inp = x
            x = self.dwconv(x)
            x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
            x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
            x = self.gamma * x
            x = x.permute(0, 3, 1, 2)  # (N, C, H, W)
            return inp + self.drop_path(x)


    class ConvNeXt(nn.Module):
        def __init__(self, norm="cf", drop="wrap", dims=(8, 16), classes=3):
            super().__init__()
            norm_cls, drop_cls = NORMS[norm], DROPS[drop]
            self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 2, stride=2), norm_cls(dims[0]))
            self.stage1 = nn.Sequential(Block(dims[0], drop_cls), Block(dims[0], drop_cls))
            self.down = nn.Sequential(norm_cls(dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
            self.stage2 = Block(dims[1], drop_cls)
            self.norm = nn.LayerNorm(dims[1])
            self.head = nn.Linear(dims[1], classes)

        def forward(self, x):
            x = self.stage2(self.down(self.stage1(self.stem(x))))
            return self.head(self.norm(x.mean([-2, -1])))


    def channel_shuffle(x, groups: int):
        n, c, h, w = x.size()
        x = x.view(n, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(n, -1, h, w)


    def conv_bn(i, o, k=1, stride=1, groups=1, relu=True):
        layers = [nn.Conv2d(i, o, k, stride, k // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(o)]
        return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


    class ShuffleUnit(nn.Module):
        """ShuffleNetV2's unit: stride 1 splits the channels in halves, stride 2 has two
        branches on the whole input."""

        def __init__(self, inp, oup, stride, split="chunk"):
            super().__init__()
            self.stride, self.split = stride, split
            bf = oup // 2
            if stride > 1:
                self.branch1 = nn.Sequential(
                    conv_bn(inp, inp, 3, stride, groups=inp, relu=False), conv_bn(inp, bf))
            self.branch2 = nn.Sequential(
                conv_bn(inp if stride > 1 else bf, bf),
                conv_bn(bf, bf, 3, stride, groups=bf, relu=False), conv_bn(bf, bf))

        def forward(self, x):
            if self.stride > 1:
                out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
            else:
                if self.split == "chunk":
                    x1, x2 = x.chunk(2, dim=1)
                elif self.split == "split":
                    x1, x2 = torch.split(x, x.size(1) // 2, dim=1)
                else:  # sizes written as numbers: followed, kept whole
                    x1, x2 = x.split([8, 8], dim=1)
                out = torch.cat((x1, self.branch2(x2)), dim=1)
            return channel_shuffle(out, 2)


    class ShuffleNetV2(nn.Module):
        def __init__(self, split="chunk", c=(8, 16), classes=3):
            super().__init__()
            self.stem = conv_bn(3, c[0], 3, 2)
            self.stage = nn.Sequential(ShuffleUnit(c[0], c[1], 2),
                                       ShuffleUnit(c[1], c[1], 1, split),
                                       ShuffleUnit(c[1], c[1], 1, split))
            self.conv5 = conv_bn(c[1], 32)
            self.fc = nn.Linear(32, classes)

        def forward(self, x):
            return self.fc(self.conv5(self.stage(self.stem(x))).mean([2, 3]))


    def _ready(model):
        for m in model.modules():  # non-trivial statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
            if isinstance(m, (nn.LayerNorm, LayerNormCF)):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        return model.eval()


    def convnext(norm="cf", drop="wrap"):
        torch.manual_seed(0)
        return _ready(ConvNeXt(norm, drop))


    def convnext_ln2d():
        return convnext("ln2d")


    def convnext_permute():
        return convnext("permute", "timm")


    def shufflenet(split="chunk"):
        torch.manual_seed(0)
        return _ready(ShuffleNetV2(split))
''')
SHAPE = (3, 16, 16)
X = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
NORMS = ["cf", "ln2d", "permute"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_models_module(tmp_path_factory.mktemp("models"), "cnn_family_models", MODELS)


def run(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def group_with(groups, module: str, kind: str):
    return next(g for g in groups if any(m.module == module and m.kind == kind
                                         for m in g.members))


def pruned_shrinks(model: nn.Module, *, scope: str = "channels", **config) -> nn.Module:
    """Prune at ratio 0.5: forward works, output shape kept, MACs and params fall."""
    before = (count_macs(model, SHAPE), count_params(model)[0], run(model).shape)
    prune_channels_(model, ChannelPruneConfig(ratio=0.5, **config), X, scope=scope)
    after = (count_macs(model, SHAPE), count_params(model)[0], run(model).shape)
    assert after[2] == before[2]
    assert after[0] < before[0] and after[1] < before[1], (before, after)
    return model


def dead_equals_pruned(model: nn.Module, producer: str, gone: list[int]) -> None:
    """Removing channels ``gone`` of the group ``producer`` makes equals zeroing them in the
    original, where every producer is followed by a BatchNorm of the group (zero scale and
    shift: the channel is 0 everywhere it is read) -- exact, whatever the layout (halves,
    shuffled blocks)."""
    groups = channel_groups(model, X)
    group = group_with(groups, producer, "out")
    dead = copy.deepcopy(model)
    norms = [m for m in group.members if m.kind == "norm"]
    assert norms
    for m in norms:
        bn = dead.get_submodule(m.module)
        idx = m.indices(torch.tensor(gone))
        with torch.no_grad():
            bn.weight[idx], bn.bias[idx] = 0.0, 0.0
    keeps = [torch.tensor([c for c in range(g.size) if g is not group or c not in gone])
             for g in groups]
    pruned = copy.deepcopy(model)
    apply_keep_(pruned, groups, keeps)
    torch.testing.assert_close(run(pruned), run(dead), atol=1e-5, rtol=1e-5)


def reloads(path, factory: str, model: nn.Module, tmp_path) -> None:
    file = tmp_path / f"{factory}.safetensors"
    spec = {"python": f"{path}:{factory}", "input_shape": list(SHAPE)}
    save_artifact(model, file, model_spec=spec, input_shape=list(SHAPE), num_classes=3)
    loaded, _ = load_artifact(file)
    torch.testing.assert_close(run(loaded.eval()), run(model.eval()), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- ConvNeXt


@pytest.mark.parametrize("norm", NORMS)
def test_convnext_stream_group_crosses_permutes_norms_and_layer_scale(zoo, norm):
    model = zoo[1].convnext(norm)
    groups = channel_groups(model, X)
    stream = group_with(groups, "stem.0", "out")
    kinds = {(m.module, m.kind) for m in stream.members}
    assert {("stage1.0.dwconv", "depthwise"), ("stage1.0.norm", "norm"),
            ("stage1.0.pwconv1", "in"), ("stage1.0.pwconv2", "out"),
            ("stage1.0", "param:gamma:0"), ("stage1.1", "param:gamma:0"),
            ("down.1", "in")} <= kinds
    norms = {"cf": {("stem.1", "param:weight:0"), ("down.0", "param:bias:0")},
             "ln2d": {("stem.1", "norm"), ("down.0", "norm")},
             "permute": {("stem.1.norm", "norm"), ("down.0.norm", "norm")}}[norm]
    assert norms <= kinds
    assert stream.prunable and stream.size == 8
    assert group_with(groups, "stage1.0.pwconv1", "out").size == 32  # the 4C hidden features


@pytest.mark.parametrize("norm", NORMS)
def test_convnext_prunes_physically(zoo, norm):
    model = pruned_shrinks(zoo[1].convnext(norm), importance="group_l2")
    assert model.stem[0].out_channels == 4 and model.down[1].in_channels == 4
    block = model.stage1[0]
    assert block.dwconv.groups == block.dwconv.out_channels == 4
    assert block.norm.normalized_shape == (4,) and block.gamma.shape == (4,)
    assert (block.pwconv1.in_features, block.pwconv2.out_features) == (4, 4)
    assert block.pwconv1.out_features == 32  # prune.channels leaves the hidden Linear features
    assert model.stage2.gamma.shape == (8,) and model.head.in_features == 8
    stem_norm = model.stem[1]
    shape = stem_norm.norm.weight.shape if norm == "permute" else stem_norm.weight.shape
    assert shape == (4,)
    if norm == "ln2d":
        assert model.down[0].normalized_shape == (4,)


def test_convnext_hidden_features_prune_as_neurons_and_equal_dead_ones(zoo):
    model = zoo[1].convnext()
    groups = prunable_groups(model, X, scope="neurons")
    hidden = group_with(groups, "stage1.0.pwconv1", "out")
    gone = [1, 5, 30]
    dead = copy.deepcopy(model)
    with torch.no_grad():  # GELU(0) = 0: a zeroed neuron adds nothing to pwconv2
        dead.stage1[0].pwconv1.weight[gone] = 0.0
        dead.stage1[0].pwconv1.bias[gone] = 0.0
    apply_keep_(model, [hidden], [torch.tensor([c for c in range(32) if c not in gone])])
    torch.testing.assert_close(run(model), run(dead), atol=1e-5, rtol=1e-5)
    pruned_shrinks(zoo[1].convnext(), scope="neurons")


@pytest.mark.parametrize("name", ["convnext", "shufflenet"])
def test_ratio_zero_keeps_outputs_exactly(zoo, name):
    model = getattr(zoo[1], name)()
    reference = run(model)
    report = prune_channels_(model, ChannelPruneConfig(ratios={}), X)  # every group loses 0
    assert report.macs_after == report.macs_before
    assert torch.equal(run(model), reference)


@pytest.mark.parametrize("factory, norm", [
    ("convnext", "cf"),
    ("convnext_ln2d", "ln2d"),  # the tuple normalized_shape of a LayerNorm subclass
    ("convnext_permute", "permute"),
])
def test_pruned_convnext_reloads_from_its_artifact(zoo, tmp_path, factory, norm):
    path, module = zoo
    model = pruned_shrinks(getattr(module, factory)())
    reloads(path, factory, model, tmp_path)


# ----------------------------------------------------------------------------- stochastic depth


@pytest.mark.parametrize("drop", ["wrap", "timm"])
def test_drop_path_passes_channels_in_training_mode(zoo, drop):
    """Traced in training mode the wrapped drop_path is one call (probed: it acts on each
    channel alone, the same dropped samples either way); timm's is traced through
    (x.new_empty(...).bernoulli_(), a (N, 1, 1, 1) mask). Both pass the channels through."""
    model = zoo[1].convnext("permute", drop).train()
    graph = channel_groups(model, X)
    stream = group_with(graph, "stem.0", "out")
    assert ("stage1.1", "param:gamma:0") in {(m.module, m.kind) for m in stream.members}
    assert stream.prunable
    model = pruned_shrinks(model)
    assert model.training and model.stage1[1].gamma.shape == (4,)
    assert model.stage1[1].drop_path.training


class NotPerChannel(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
        self.leaf = nn.Softmax2d() if how == "module" else nn.Softmax(dim=-1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "function":
            y = channel_mix(y)
        else:
            y = self.leaf(y)
        return self.head(y).mean((2, 3))


def channel_mix(x):
    return x + x.flip(1)  # mixes channel c with channel C-1-c


torch.fx.wrap("channel_mix")


def test_leaves_that_mix_channels_are_refused_naming_the_node_and_options():
    with pytest.raises(UnsupportedError, match=r"node 'channel_mix'.*not understood \(its output "
                       r"channels do not follow.*FUNCTION_KINDS\[channel_mix\] = 'same'"):
        channel_groups(NotPerChannel("function"), X)
    with pytest.raises(UnsupportedError, match=r"module 'leaf' \(Softmax2d\).*register_layer_"
                       r"spec\(LayerSpec\(Softmax2d, graph_kind='same'\)\).*prune\.magnitude"):
        channel_groups(NotPerChannel("module"), X)
    # a softmax over the width acts on each channel alone: probed, followed
    model = NotPerChannel("width")
    group = group_with(channel_groups(model, X), "conv", "out")
    assert group.prunable and ("head", "in") in {(m.module, m.kind) for m in group.members}
    pruned_shrinks(model)


class Jitter(nn.Module):
    """A user module with a forward tracing cannot follow (data-dependent control flow)."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 1.0
        return x


def test_a_registered_leaf_without_a_kind_is_probed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Jitter(), nn.ReLU(), nn.Conv2d(8, 2, 1),
                          nn.Flatten())
    with pytest.raises(UnsupportedError, match="torch.fx-traceable"):
        channel_groups(model, X)
    register_layer_spec(LayerSpec(Jitter))  # a leaf for the tracer, no graph kind
    try:
        group = group_with(channel_groups(model, X), "0", "out")
        assert group.prunable and ("3", "in") in {(m.module, m.kind) for m in group.members}
    finally:
        LAYER_SPECS.pop(Jitter)


# ----------------------------------------------------------------------------- ShuffleNetV2


@pytest.mark.parametrize("split", ["chunk", "split"])
def test_shufflenet_halves_are_tied_and_branches_follow(zoo, split):
    groups = channel_groups(zoo[1].shufflenet(split), X)
    sizes = {str(g): g.size for g in groups}
    assert all(g.prunable for g in groups if not g.pinned)
    # the stride-2 unit's branches, tied by the shuffle, then halved by each chunk(2):
    passed = group_with(groups, "stage.0.branch1.1.0", "out")
    assert passed.size == 2 and passed.prunable, sizes
    reads = {(m.module, m.kind, m.block) for m in passed.members}
    assert ("stage.1.branch2.0.0", "in", 2) in reads and ("conv5.0", "in", 8) in reads
    for unit in ("stage.0", "stage.1", "stage.2"):  # each branch's own channels are free
        assert group_with(groups, f"{unit}.branch2.0.0", "out").size == 8


@pytest.mark.parametrize("split", ["chunk", "split"])
def test_shufflenet_pruned_equals_zeroed_channels(zoo, split):
    model = zoo[1].shufflenet(split)
    dead_equals_pruned(model, "stage.0.branch1.1.0", [1])  # halved twice: 8 channels each
    dead_equals_pruned(model, "stage.1.branch2.0.0", [0, 3, 4])
    dead_equals_pruned(model, "stem.0", [2, 7])


@pytest.mark.parametrize("importance", ["l1", "l2", "group_l2", "fpgm", "bn_scale"])
def test_shufflenet_prunes_physically(zoo, importance):
    model = pruned_shrinks(zoo[1].shufflenet(), importance=importance)
    unit2, unit1 = model.stage[0], model.stage[1]
    assert unit2.branch1[0][0].groups == unit2.branch1[0][0].out_channels == 4  # stride-2 unit
    assert unit2.branch1[1][0].out_channels == unit2.branch2[2][0].out_channels == 4
    assert unit1.branch2[0][0].in_channels == 4 and unit1.branch2[0][0].out_channels == 4
    assert model.conv5[0].in_channels == 8


def test_split_at_sizes_written_as_numbers_keeps_those_channels(zoo):
    model = zoo[1].shufflenet("fixed")
    groups = channel_groups(model, X)
    passed = group_with(groups, "stage.0.branch1.1.0", "out")
    assert any("split" in p and "[8, 8]" in p for p in passed.pinned), passed.pinned
    pruned_shrinks(model)  # the branches' own channels still go


def test_pruned_shufflenet_reloads_from_its_artifact(zoo, tmp_path):
    path, module = zoo
    model = pruned_shrinks(module.shufflenet())
    reloads(path, "shufflenet", model, tmp_path)


def test_chunk_of_a_concatenation_ties_its_parts():
    """chunk(2) of cat(a, b) with a and b as wide: a's channel c is kept with b's channel c."""

    class CatChunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            p, q = torch.cat([self.a(x), self.b(x)], 1).chunk(2, dim=1)
            return self.head(p * q).mean((2, 3))

    group = group_with(channel_groups(CatChunk(), X), "a", "out")
    assert {(m.module, m.kind) for m in group.members} == {("a", "out"), ("b", "out"),
                                                          ("head", "in")}
    pruned_shrinks(CatChunk().eval())


class LayerScale2d(nn.Module):
    """A channels-first layer scale (timm's LayerScale2d), written three ways."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "view":
            y = y * self.gamma.view(1, -1, 1, 1)
        elif self.how == "unsqueeze":
            y = y * self.gamma.unsqueeze(-1).unsqueeze(-1)
        else:
            y = y * self.gamma.view(1, 8, 1, 1)
        return self.head(y).mean((2, 3))


@pytest.mark.parametrize("how", ["view", "unsqueeze", "literal"])
def test_layer_scale_viewed_channels_first_is_sliced_with_its_channels(how):
    model = LayerScale2d(how)
    group = group_with(channel_groups(model, X), "conv", "out")
    if how == "literal":  # the view would not fit a pruned gamma: the channels stay
        assert any("hard-codes 8 channels" in p for p in group.pinned), group.pinned
        return
    assert ("", "param:gamma:0") in {(m.module, m.kind) for m in group.members}
    pruned_shrinks(model)
    assert model.gamma.shape == (4,)


class OwnLayerNorm(nn.Module):
    """A channels-last LayerNorm of one's own, calling F.layer_norm with its parameters."""

    def __init__(self, c: int, computed: bool):
        super().__init__()
        self.computed = computed
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.zeros(c))
        self.shape = (c,)

    def forward(self, x):
        shape = x.shape[-1:] if self.computed else self.shape
        return torch.nn.functional.layer_norm(x, shape, self.weight, self.bias)


@pytest.mark.parametrize("computed", [True, False])
def test_layer_norm_of_ones_own_slices_its_parameters_unless_its_shape_is_a_number(computed):
    model = nn.Sequential(nn.Linear(5, 8), OwnLayerNorm(8, computed), nn.Linear(8, 2))
    x = torch.randn(3, 5)
    group = group_with(channel_groups(model, x), "0", "out")
    if not computed:  # (8,) stays in the pruned forward: the channels stay
        assert any("hard-codes normalized_shape (8,)" in p and "x.shape[-1:]" in p
                   for p in group.pinned), group.pinned
        return
    assert {("1", "param:weight:0"), ("1", "param:bias:0")} <= {
        (m.module, m.kind) for m in group.members}
    prune_channels_(model, ChannelPruneConfig(ratio=0.5), x, scope="neurons")
    assert model[1].weight.shape == (4,) and model(x).shape == (3, 2)
