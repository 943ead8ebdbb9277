"""Structured pruning of transformer families (issue 9, item 6): a ViT with
nn.MultiheadAttention (cls token, positional embedding), Swin-/MaxViT-style windowed attention
(partition / reverse reshapes, shifted windows, a relative position bias table) and an
MLP-Mixer (token-mixing Linear layers across a transposed token axis). Each prunes physically:
the forward runs, MACs and parameters fall, ratio 0 reproduces the outputs exactly, removed
channels that carried nothing change nothing, and the pruned model reloads from its artifact."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from conftest import write_models_module
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.graph import Member, channel_groups
from lighten.measure import count_macs, count_params
from lighten.prune.heads import HeadPruneConfig, PrunedMultiheadAttention, prune_heads_
from lighten.prune.importance import make_importance
from lighten.prune.structured import (
    ChannelPruneConfig,
    NeuronPruneConfig,
    apply_keep_,
    plan_keep,
    prunable_groups,
    prune_channels_,
)

MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    def norm(dim, on=True):
        return nn.LayerNorm(dim) if on else nn.Identity()


    class Block(nn.Module):
        """Pre-norm encoder block: LayerNorm -> MultiheadAttention -> residual, LayerNorm ->
        MLP -> residual."""

        def __init__(self, dim, heads, hidden, norms=True, batch_first=True):
            super().__init__()
            self.batch_first = batch_first
            self.norm1, self.norm2 = norm(dim, norms), norm(dim, norms)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

        def forward(self, x):
            h = self.norm1(x)
            if not self.batch_first:
                h = h.transpose(0, 1)
            a = self.attn(h, h, h, need_weights=False)[0]
            if not self.batch_first:
                a = a.transpose(0, 1)
            x = x + a
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


    class TinyViT(nn.Module):
        """Patch conv, flatten/transpose, cls token concat, positional embedding, blocks."""

        def __init__(self, dim=16, heads=4, depth=2, classes=5, norms=True):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 4, stride=4)  # 3x16x16 -> 16 tokens
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
            self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.5)
            self.blocks = nn.Sequential(*(Block(dim, heads, 2 * dim, norms, batch_first=i == 0)
                                          for i in range(depth)))
            self.norm = norm(dim, norms)
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
            return self.head(self.norm(self.blocks(t))[:, 0])


    class HandAttention(nn.Module):
        """Written out: q/k/v Linear layers (or one fused qkv) reshaped to heads, scaled dot
        products, optionally a learned bias per head added to the scores."""

        def __init__(self, dim, heads, fused=False, tokens=None):
            super().__init__()
            self.heads, self.head_dim, self.fused = heads, dim // heads, fused
            if fused:
                self.qkv = nn.Linear(dim, 3 * dim)
            else:
                self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
            self.proj = nn.Linear(dim, dim)
            self.bias = nn.Parameter(torch.randn(heads, tokens, tokens)) if tokens else None

        def forward(self, x):
            b, t, _ = x.shape
            if self.fused:
                q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            else:
                q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2)
                           for f in (self.q, self.k, self.v))
            att = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            if self.bias is not None:
                att = att + self.bias
            return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


    class HandBlock(nn.Module):
        def __init__(self, dim, heads, fused=False, tokens=None):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = HandAttention(dim, heads, fused, tokens)
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


    class HandViT(nn.Module):
        def __init__(self, dim=16, classes=5):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 4, stride=4)  # 3x16x16 -> 16 tokens
            self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.5)
            self.blocks = nn.Sequential(HandBlock(dim, 4), HandBlock(dim, 4, True, 16))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(t)).mean(1))


    def window_partition(x, ws):  # (B, H, W, C) -> (B * windows, ws * ws, C)
        b, h, w, c = x.shape
        x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous()
        return x.view(-1, ws * ws, c)


    def window_reverse(x, ws, b, h, w):  # (B * windows, ws * ws, C) -> (B, H, W, C)
        x = x.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous()
        return x.view(b, h, w, -1)


    def grid_partition(x, g):  # MaxViT's grid: every (H/g, W/g)-th pixel in one window
        b, h, w, c = x.shape
        x = x.view(b, g, h // g, g, w // g, c).permute(0, 2, 4, 1, 3, 5).contiguous()
        return x.view(-1, g * g, c)


    def grid_reverse(x, g, b, h, w):
        x = x.view(b, h // g, w // g, g, g, -1).permute(0, 3, 1, 4, 2, 5).contiguous()
        return x.view(b, h, w, -1)


    class WindowBlock(nn.Module):
        """Swin block over (B, H, W, C): windows (or a MaxViT grid), optional cyclic shift with
        its mask, a relative position bias table (one column per head) given to the attention
        as its mask."""

        def __init__(self, dim, heads, ws, res, shift=0, grid=False):
            super().__init__()
            self.ws, self.shift, self.grid, self.heads = ws, shift, grid, heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.rel_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
            ij = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
            ij = ij.flatten(1)
            rel = (ij[:, :, None] - ij[:, None, :]).permute(1, 2, 0) + ws - 1
            self.register_buffer("rel_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1],
                                 persistent=False)
            if shift:
                label = torch.zeros(1, res, res, 1)
                cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
                for n, (hs, vs) in enumerate((h, v) for h in cuts for v in cuts):
                    label[:, hs, vs, :] = n
                windows = window_partition(label, ws).squeeze(-1)
                mask = windows[:, None, :] - windows[:, :, None]
                self.register_buffer("shift_mask", (mask != 0).float() * -100.0,
                                     persistent=False)
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, x):
            b, h, w, c = x.shape
            n = self.ws * self.ws
            y = self.norm1(x)
            if self.shift:
                y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            part = grid_partition if self.grid else window_partition
            win = part(y, self.ws)
            bias = self.rel_table[self.rel_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
            mask = bias.unsqueeze(0).expand(win.shape[0], -1, -1, -1)
            if self.shift:
                mask = mask + self.shift_mask.repeat(b, 1, 1).unsqueeze(1)
            a = self.attn(win, win, win, attn_mask=mask.reshape(-1, n, n),
                          need_weights=False)[0]
            back = grid_reverse if self.grid else window_reverse
            y = back(a, self.ws, b, h, w)
            if self.shift:
                y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
            x = x + y
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


    class PatchMerging(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm = nn.LayerNorm(4 * dim)
            self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

        def forward(self, x):  # (B, H, W, C) -> (B, H/2, W/2, 2C)
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                           x[:, 1::2, 1::2]], -1)
            return self.reduction(self.norm(x))


    class TinySwin(nn.Module):
        """Patch conv to channels-last, window / shifted window / grid blocks, patch merging."""

        def __init__(self, dim=8, classes=5):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 2, stride=2)  # 3x8x8 -> 4x4 grid
            self.stage1 = nn.Sequential(WindowBlock(dim, 2, 2, 4),
                                        WindowBlock(dim, 2, 2, 4, shift=1),
                                        WindowBlock(dim, 2, 2, 4, grid=True))
            self.merge = PatchMerging(dim)
            self.stage2 = WindowBlock(2 * dim, 4, 2, 2)
            self.norm = nn.LayerNorm(2 * dim)
            self.head = nn.Linear(2 * dim, classes)

        def forward(self, x):
            t = self.patch(x).permute(0, 2, 3, 1)
            t = self.stage2(self.merge(self.stage1(t)))
            return self.head(self.norm(t).mean((1, 2)))


    class MixerBlock(nn.Module):
        """Token mixing (a Linear pair across the transposed token axis), channel mixing."""

        def __init__(self, tokens, dim, token_hidden, channel_hidden):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.tok1 = nn.Linear(tokens, token_hidden)
            self.tok2 = nn.Linear(token_hidden, tokens)
            self.ch1 = nn.Linear(dim, channel_hidden)
            self.ch2 = nn.Linear(channel_hidden, dim)

        def forward(self, x):  # (B, T, C)
            y = self.norm1(x).transpose(1, 2)  # (B, C, T)
            x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
            return x + self.ch2(F.gelu(self.ch1(self.norm2(x))))


    class TinyMixer(nn.Module):
        def __init__(self, dim=16, classes=5):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 4, stride=4)  # 3x16x16 -> 16 tokens
            self.blocks = nn.Sequential(MixerBlock(16, dim, 12, 32), MixerBlock(16, dim, 12, 32))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(self.norm(self.blocks(t)).mean(1))


    def _ready(model):
        with torch.no_grad():  # LayerNorms with non-trivial scales, so channels differ
            for m in model.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        return model.eval()


    def vit():
        torch.manual_seed(0)
        return _ready(TinyViT())


    def vit_plain():  # no LayerNorms: a channel that carries nothing changes nothing
        torch.manual_seed(0)
        return _ready(TinyViT(norms=False))


    def hand_vit():
        torch.manual_seed(0)
        return _ready(HandViT())


    def swin():
        torch.manual_seed(0)
        return _ready(TinySwin())


    def mixer():
        torch.manual_seed(0)
        return _ready(TinyMixer())
''')

SHAPES = {"vit": (3, 16, 16), "hand_vit": (3, 16, 16), "vit_plain": (3, 16, 16),
          "swin": (3, 8, 8), "mixer": (3, 16, 16)}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return write_models_module(tmp_path_factory.mktemp("models"), "transformer_families", MODELS)


def inputs(name: str, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, *SHAPES[name], generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def group_of(groups, member: Member):
    return next(g for g in groups if member in g.members)


def reloads(zoo, tmp_path, name: str, model: nn.Module) -> None:
    """The pruned model saves and loads back (model_spec python: file:factory) to the same
    outputs."""
    path, _ = zoo
    x = inputs(name)
    file = tmp_path / f"{name}.safetensors"
    spec = {"python": f"{path}:{name}", "input_shape": list(SHAPES[name])}
    save_artifact(model, file, model_spec=spec, input_shape=list(SHAPES[name]), num_classes=5)
    loaded, _ = load_artifact(file)
    torch.testing.assert_close(run(loaded, x), run(model, x), atol=1e-6, rtol=0)


def ratio_zero_is_exact(model: nn.Module, name: str, scope: str = "channels") -> None:
    x = inputs(name)
    reference = run(model, x)
    groups = prunable_groups(model, x, scope=scope)
    assert groups
    scores = [make_importance("l2")(model, g) for g in groups]
    pruned = copy.deepcopy(model)
    apply_keep_(pruned, groups, plan_keep(groups, scores, 0.0))
    assert torch.equal(run(pruned, x), reference)


def shrinks(model: nn.Module, name: str, config, scope: str = "channels"):
    """Prune ``model`` in place; the forward runs, MACs and parameters fall."""
    x = inputs(name)
    macs, params = count_macs(model, SHAPES[name]), count_params(model)[0]
    report = prune_channels_(model, config, x, scope=scope)
    assert run(model, x).shape == (3, 5)
    assert count_macs(model, SHAPES[name]) < macs and count_params(model)[0] < params
    assert report.macs_after < report.macs_before
    return report


# ----------------------------------------------------------------------------- ViT + MHA


def test_vit_embedding_group_spans_attention_cls_and_positions(zoo):
    groups = channel_groups(zoo[1].vit(), inputs("vit"))
    width = group_of(groups, Member("patch", "out"))
    assert width.size == 16 and width.prunable
    assert {Member("", "param:cls:2"), Member("", "param:pos:2"),
            Member("blocks.0.attn", "param:in_proj_weight:1"),
            Member("blocks.0.attn.out_proj", "out"),
            Member("blocks.1.attn", "param:in_proj_weight:1"),  # batch_first=False
            Member("blocks.1.attn.out_proj", "out"), Member("blocks.0.norm1", "norm"),
            Member("blocks.1.fc1", "in"), Member("blocks.1.fc2", "out"),
            Member("norm", "norm"), Member("head", "in")} <= set(width.members)
    hidden = group_of(groups, Member("blocks.0.fc1", "out"))
    assert hidden.size == 32 and hidden.prunable


def test_vit_ratio_zero_reproduces_outputs(zoo):
    ratio_zero_is_exact(zoo[1].vit(), "vit")
    ratio_zero_is_exact(zoo[1].vit(), "vit", scope="neurons")


def test_vit_removed_empty_channel_changes_nothing(zoo):
    model = zoo[1].vit_plain()
    x = inputs("vit_plain")
    with torch.no_grad():  # residual channel 5 carries nothing anywhere: l1 removes it first
        for t in (model.patch.weight, model.patch.bias, model.cls[0, 0], model.pos[0].T):
            t[5] = 0
        for block in model.blocks:
            for t in (block.attn.out_proj.weight, block.attn.out_proj.bias,
                      block.fc2.weight, block.fc2.bias):
                t[5] = 0
    reference = run(model, x)
    prune_channels_(model, ChannelPruneConfig(ratio=1 / 16, importance="l1"), x)
    attn = model.blocks[0].attn
    assert isinstance(attn, PrunedMultiheadAttention)
    assert (attn.embed_dim, attn.out_dim, attn.num_heads, attn.head_dim) == (15, 15, 4, 4)
    assert model.cls.shape == (1, 1, 15) and model.pos.shape == (1, 17, 15)
    torch.testing.assert_close(run(model, x), reference, atol=1e-5, rtol=0)


def test_vit_prunes_width_hidden_and_heads_and_reloads(zoo, tmp_path):
    model = zoo[1].vit()
    shrinks(model, "vit", ChannelPruneConfig(ratio=0.5))
    assert model.patch.out_channels == 8 and model.cls.shape == (1, 1, 8)
    assert model.pos.shape == (1, 17, 8) and model.norm.normalized_shape == (8,)
    for block in model.blocks:
        attn = block.attn
        assert isinstance(attn, PrunedMultiheadAttention)
        assert attn.in_proj_weight.shape == (48, 8) and attn.out_proj.weight.shape == (8, 16)
        assert block.fc1.in_features == 8 and block.fc2.out_features == 8
    shrinks(model, "vit", NeuronPruneConfig(ratio=0.5), scope="neurons")  # MLP hidden width
    assert [b.fc1.out_features for b in model.blocks] == [16, 16]
    params = count_params(model)[0]
    prune_heads_(model, HeadPruneConfig(ratio=0.5), inputs("vit"))  # heads compose
    assert [b.attn.num_heads for b in model.blocks] == [2, 2]
    assert count_params(model)[0] < params and run(model, inputs("vit")).shape == (3, 5)
    reloads(zoo, tmp_path, "vit", model)


def test_vit_heads_first_then_width(zoo, tmp_path):
    model = zoo[1].vit()
    prune_heads_(model, HeadPruneConfig(ratio=0.5), inputs("vit"))
    shrinks(model, "vit", ChannelPruneConfig(ratio=0.25))
    attn = model.blocks[1].attn
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (12, 2, 4)
    reloads(zoo, tmp_path, "vit", model)


def test_written_out_attention_prunes_its_embedding_and_keeps_heads_whole(zoo, tmp_path):
    groups = channel_groups(zoo[1].hand_vit(), inputs("hand_vit"))
    width = group_of(groups, Member("patch", "out"))
    assert width.prunable and {
        Member("", "param:pos:2"), Member("blocks.0.attn.q", "in"),
        Member("blocks.0.attn.v", "in"), Member("blocks.0.attn.proj", "out"),
        Member("blocks.1.attn.qkv", "in"),
        Member("blocks.1.attn.proj", "out")} <= set(width.members)
    for producer in ("blocks.0.attn.q", "blocks.1.attn.qkv"):
        group = group_of(groups, Member(producer, "out"))
        assert "split into attention heads" in group.pinned[0] and "prune.heads" in group.pinned[0]
    ratio_zero_is_exact(zoo[1].hand_vit(), "hand_vit")
    model = zoo[1].hand_vit()
    shrinks(model, "hand_vit", ChannelPruneConfig(ratio=0.5))
    attn = model.blocks[1].attn
    assert model.pos.shape == (1, 16, 8) and attn.qkv.weight.shape == (48, 8)
    assert attn.proj.weight.shape == (8, 16)
    # heads compose (prune.heads does not slice a per-head bias: that block is refused)
    with pytest.raises(UnsupportedError, match=r"removing heads of \['blocks.1.attn'\]"):
        prune_heads_(model, HeadPruneConfig(ratio=0.5), inputs("hand_vit"))
    prune_heads_(model, HeadPruneConfig(ratio=0.5, ignore=["blocks.1.attn"]), inputs("hand_vit"))
    assert model.blocks[0].attn.heads == 2 and model.blocks[0].attn.q.weight.shape == (8, 8)
    assert run(model, inputs("hand_vit")).shape == (3, 5)
    reloads(zoo, tmp_path, "hand_vit", model)


# ----------------------------------------------------------------------------- windows


def test_swin_channels_follow_window_partition_and_reverse(zoo):
    groups = channel_groups(zoo[1].swin(), inputs("swin"))
    stage1 = group_of(groups, Member("patch", "out"))
    assert stage1.prunable
    for i in range(3):  # window, shifted window, grid
        assert {Member(f"stage1.{i}.attn", "param:in_proj_weight:1"),
                Member(f"stage1.{i}.attn.out_proj", "out"),
                Member(f"stage1.{i}.fc2", "out")} <= set(stage1.members)
    # patch merging concatenates four shifted views of the same channels: four offsets
    assert {Member("merge.norm", "norm", 8 * k) for k in range(4)} <= set(stage1.members)
    assert {Member("merge.reduction", "in", 8 * k) for k in range(4)} <= set(stage1.members)
    stage2 = group_of(groups, Member("merge.reduction", "out"))
    assert stage2.prunable and Member("head", "in") in stage2.members
    assert not any(m.module.endswith("rel_table") or "rel_table" in m.kind
                   for g in groups for m in g.members)  # heads are prune.heads' business


def test_swin_ratio_zero_and_half(zoo, tmp_path):
    ratio_zero_is_exact(zoo[1].swin(), "swin")
    model = zoo[1].swin()
    tables = [b.rel_table.detach().clone() for b in model.stage1]
    shrinks(model, "swin", ChannelPruneConfig(ratio=0.5))
    assert model.patch.out_channels == 4 and model.merge.norm.normalized_shape == (16,)
    # stage 2's width, made by a Linear (patch merging), is an embedding read by attention
    assert model.merge.reduction.weight.shape == (8, 16) and model.stage2.attn.embed_dim == 8
    assert model.stage1[1].attn.embed_dim == 4
    for block, table in zip(model.stage1, tables, strict=True):
        assert torch.equal(block.rel_table, table)  # one column per head: untouched
    shrinks(model, "swin", NeuronPruneConfig(ratio=0.5), scope="neurons")  # MLP hidden widths
    assert model.stage1[0].fc1.out_features == 8 and model.stage2.fc1.out_features == 16
    reloads(zoo, tmp_path, "swin", model)


# ----------------------------------------------------------------------------- token mixing


def test_mixer_token_hidden_is_prunable_token_count_is_not(zoo):
    groups = channel_groups(zoo[1].mixer(), inputs("mixer"))
    width = group_of(groups, Member("patch", "out"))
    assert width.prunable and {Member("blocks.0.norm1", "norm"), Member("blocks.0.ch2", "out"),
                               Member("blocks.1.ch1", "in")} <= set(width.members)
    assert not any(m.module.startswith("blocks.0.tok") for m in width.members)
    hidden = group_of(groups, Member("blocks.0.tok1", "out"))
    assert hidden.size == 12 and hidden.prunable
    assert set(hidden.members) == {Member("blocks.0.tok1", "out"), Member("blocks.0.tok2", "in")}
    tokens = group_of(groups, Member("blocks.0.tok2", "out"))
    assert tokens.size == 16 and not tokens.prunable and "token mixing" in tokens.pinned[0]


def test_mixer_ratio_zero_and_half(zoo, tmp_path):
    ratio_zero_is_exact(zoo[1].mixer(), "mixer")
    ratio_zero_is_exact(zoo[1].mixer(), "mixer", scope="neurons")
    model = zoo[1].mixer()
    shrinks(model, "mixer", ChannelPruneConfig(ratio=0.5))
    shrinks(model, "mixer", NeuronPruneConfig(ratio=0.5), scope="neurons")
    for block in model.blocks:
        assert (block.tok1.in_features, block.tok1.out_features) == (16, 6)
        assert (block.tok2.in_features, block.tok2.out_features) == (6, 16)  # tokens stay
        assert (block.ch1.in_features, block.ch1.out_features) == (8, 16)
    reloads(zoo, tmp_path, "mixer", model)


# ----------------------------------------------------------------------------- limits


class Shifty(nn.Module):
    """A roll along the channel axis, a parameter combined per channel after a computation."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # (B, T, 4)
        h = self.proj(x)
        if self.how == "roll":
            h = torch.roll(h, 1, -1)
        else:
            h = h * self.scale.exp()  # computed from the parameter: not sliced with channels
        return self.head(h).mean(1)


def test_what_cannot_be_followed_names_the_node():
    x = torch.randn(2, 5, 4)
    with pytest.raises(UnsupportedError, match="node 'roll'.*rolls the channel axis"):
        channel_groups(Shifty("roll"), x)
    group = group_of(channel_groups(Shifty("derived"), x), Member("proj", "out"))
    assert not group.prunable
    assert any("'exp'" in p and "ignore:" in p for p in group.pinned)


def test_attention_with_its_own_key_width_is_kept_whole():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 6)
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            kv = self.kv(x)
            return self.head(self.attn(self.q(x), kv, kv)[0]).mean(1)

    groups = channel_groups(Cross(), torch.randn(2, 5, 4))
    for producer in ("q", "kv"):
        assert any("'attn': MultiheadAttention with kdim/vdim" in p
                   for p in group_of(groups, Member(producer, "out")).pinned)
