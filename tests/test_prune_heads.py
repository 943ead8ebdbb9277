"""prune.heads: heads leave nn.MultiheadAttention and hand-written attention physically; outputs
keep their shape, parameters drop by exactly the heads' rows/columns, ONNX and artifacts agree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.measure import count_params
from lighten.prune.heads import (
    HeadPruneConfig,
    PrunedMultiheadAttention,
    _to_pruned_mha,
    find_attention,
    prune_heads_,
)
from lighten.registry import get_step

SHAPE = (6, 8)  # (tokens, features)

MODEL_SRC = '''
import torch
from torch import nn


class HandAttention(nn.Module):
    """Separate q/k/v/out Linear layers; head count in num_heads, head_dim fixed."""

    def __init__(self, dim=16, num_heads=4, width_from_input=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.width_from_input = width_from_input
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, e = x.shape
        d = e // self.num_heads if self.width_from_input else self.head_dim
        q = self.q(x).view(b, t, -1, d).transpose(1, 2)
        k = self.k(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v(x).view(b, t, -1, d).transpose(1, 2)
        att = ((q @ k.transpose(-2, -1)) / d ** 0.5).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class TinyTransformer(nn.Module):
    def __init__(self, batch_first=True, width_from_input=False, encoder=False):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0,
                                           batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1) if encoder else layer
        self.attn = HandAttention(16, 4, width_from_input)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x, pad=None):  # (B, T, 8)
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.norm(h + self.attn(h))
        return self.head(h.mean(1))


def tiny(**kwargs):
    torch.manual_seed(0)
    return TinyTransformer(**kwargs)
'''


@pytest.fixture()
def src(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_transformer.py"
    path.write_text(MODEL_SRC)
    return path


def build(src: Path, **kwargs) -> nn.Module:
    spec = importlib.util.spec_from_file_location("tiny_transformer_test", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny(**kwargs).eval()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_finds_both_kinds_of_attention(src: Path):
    sites = find_attention(build(src))
    assert [(s.path, s.num_heads, s.head_dim, s.packed) for s in sites] == [
        ("encoder.self_attn", 4, 4, True), ("attn", 4, 4, False)]
    assert sites[1].rows == (("q", 0), ("k", 0), ("v", 0)) and sites[1].heads_attr == "num_heads"
    assert [s.path for s in find_attention(build(src), ignore=["encoder"])] == ["attn"]


@pytest.mark.parametrize("batch_first", [True, False])
def test_half_the_heads_go(tmp_path: Path, src: Path, batch_first: bool):
    model, x = build(src, batch_first=batch_first), randn(3, *SHAPE)
    before = count_params(model)[0]
    report = prune_heads_(model, HeadPruneConfig(ratio=0.5), x[:1])
    assert report.heads_after == {"encoder.self_attn": 2, "attn": 2}
    attn = model.encoder.self_attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.batch_first == batch_first
    assert attn.in_proj_weight.shape == (24, 16) and attn.out_proj.weight.shape == (16, 8)
    assert model.attn.num_heads == 2 and model.attn.head_dim == 4
    assert model.attn.q.weight.shape == (8, 16) and model.attn.out.in_features == 8
    # each site loses 2 heads * 4 dims: q/k/v rows (3 * 8 * (16 + 1)) + out columns (16 * 8)
    assert before - count_params(model)[0] == 2 * (3 * 8 * 17 + 16 * 8) == report.params_before \
        - report.params_after
    assert model(x).shape == (3, 5)

    check = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE, sample_inputs=x)
    assert check.max_abs_diff < 1e-4
    path = tmp_path / "m.safetensors"
    spec = {"python": f"{src}:tiny", "input_shape": list(SHAPE),
            "kwargs": {"batch_first": batch_first}}
    save_artifact(model, path, model_spec=spec, input_shape=SHAPE, num_classes=5)
    loaded, manifest = load_artifact(path)  # fresh 4-head skeleton
    assert {"op": "value", "path": "attn", "name": "num_heads", "value": 2} in manifest["edits"]
    assert loaded.attn.num_heads == 2 and isinstance(loaded.encoder.self_attn,
                                                     PrunedMultiheadAttention)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


def test_removing_heads_with_zero_output_columns_changes_nothing(src: Path):
    model, x = build(src), randn(4, *SHAPE)
    with torch.no_grad():  # head 2 of both sites contributes nothing and is the smallest
        mha = model.encoder.self_attn
        mha.out_proj.weight[:, 8:12] = 0
        for off in (0, 16, 32):
            mha.in_proj_weight[off + 8 : off + 12] = 0
        model.attn.out.weight[:, 8:12] = 0
        model.attn.q.weight[8:12] = model.attn.k.weight[8:12] = model.attn.v.weight[8:12] = 0
    expected = model(x)
    prune_heads_(model, HeadPruneConfig(ratio=0.25), x[:1])
    assert model.encoder.self_attn.kept == [0, 1, 3] and model.attn.num_heads == 3
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_mha_matches_torch_with_masks(batch_first: bool):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q, kv = randn(2, 5, 16), randn(2, 7, 16, seed=2)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    attn_mask = torch.zeros(5, 7, dtype=torch.bool)
    attn_mask[:, 6] = True
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 0] = True
    same = _to_pruned_mha(mha, torch.arange(4)).eval()
    for kwargs in ({}, {"attn_mask": attn_mask, "key_padding_mask": pad},
                   {"average_attn_weights": False}):
        out, w = mha(q, kv, kv, **kwargs)
        out2, w2 = same(q, kv, kv, **kwargs)
        torch.testing.assert_close(out2, out, atol=1e-5, rtol=0)
        torch.testing.assert_close(w2, w, atol=1e-5, rtol=0)
    # a per-head (B*H, L, S) mask: the kept heads' rows are used
    per_head = torch.rand(2 * 4, 5, 7, generator=torch.Generator().manual_seed(3)) < 0.3
    per_head[..., 0] = False
    pruned = _to_pruned_mha(mha, torch.tensor([0, 3])).eval()
    with torch.no_grad():
        mha.out_proj.weight[:, 4:12] = 0  # heads 1 and 2 contribute nothing
    torch.testing.assert_close(pruned(q, kv, kv, attn_mask=per_head)[0],
                               mha(q, kv, kv, attn_mask=per_head)[0], atol=1e-5, rtol=0)


def test_encoder_nested_tensor_path_is_switched_off(tmp_path: Path, src: Path):
    model, x = build(src, encoder=True), randn(2, *SHAPE)
    assert model.encoder.use_nested_tensor
    prune_heads_(model, HeadPruneConfig(ratio=0.5, ignore=["attn"]), x[:1])
    assert not model.encoder.use_nested_tensor and model.attn.num_heads == 4
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        out = model(x, pad)  # eval + padding mask: would take the nested-tensor path
    assert out.shape == (2, 5)
    path = tmp_path / "m.safetensors"
    spec = {"python": f"{src}:tiny", "input_shape": list(SHAPE), "kwargs": {"encoder": True}}
    save_artifact(model, path, model_spec=spec, input_shape=SHAPE, num_classes=5)
    loaded, _ = load_artifact(path)
    assert not loaded.encoder.use_nested_tensor
    torch.testing.assert_close(loaded(x, pad), out, atol=1e-6, rtol=0)


def test_taylor_random_and_errors(src: Path):
    x = randn(8, *SHAPE)
    batches = lambda: [(x, torch.arange(8) % 5)]  # noqa: E731
    model = build(src)
    prune_heads_(model, HeadPruneConfig(ratio=0.5, importance="taylor"), x[:1], batches=batches)
    assert model.attn.num_heads == 2 and all(p.grad is None for p in model.parameters())
    a, b = build(src), build(src)
    for m in (a, b):
        prune_heads_(m, HeadPruneConfig(ratio=0.5, importance="random"), x[:1], seed=3)
    assert a.encoder.self_attn.kept == b.encoder.self_attn.kept
    with pytest.raises(UnsupportedError, match="attn.*head count"):
        prune_heads_(build(src, width_from_input=True), HeadPruneConfig(ratio=0.5), x[:1])
    with pytest.raises(UnsupportedError, match="needs labelled data"):
        prune_heads_(build(src), HeadPruneConfig(ratio=0.5, importance="taylor"), x[:1])
    with pytest.raises(UnsupportedError, match="removes no head"):
        prune_heads_(build(src), HeadPruneConfig(ratio=0.1), x[:1])
    with pytest.raises(UnsupportedError, match="no attention found"):
        prune_heads_(nn.Sequential(nn.Linear(8, 5)), HeadPruneConfig(ratio=0.5), x[:1])
    with pytest.raises(UnsupportedError, match="no module named"):
        prune_heads_(build(src), HeadPruneConfig(ratio=0.5, ignore=["nope"]), x[:1])


def test_recipe_step(tmp_path: Path, src: Path):
    from lighten.data import bundle_from_datasets
    from lighten.step import FinetuneConfig, StepContext
    from lighten.training import TrainConfig

    data = torch.utils.data.TensorDataset(randn(32, *SHAPE), torch.arange(32) % 5)
    bundle = bundle_from_datasets(data, data)
    model = build(src).train()
    ctx = StepContext(data=bundle, train_config=TrainConfig(batch_size=16), baseline=model,
                      workdir=tmp_path, progress=False)
    step = get_step("prune.heads")
    cfg = HeadPruneConfig(ratio=0.5, importance="taylor", calibration_samples=16,
                          finetune=FinetuneConfig(epochs=1))
    out = step.apply(model, cfg, ctx)
    assert out.attn.num_heads == 2 and out.encoder.self_attn.num_heads == 2
    assert any(n.startswith("prune.heads: heads encoder.self_attn 4->2") for n in ctx.notes)
