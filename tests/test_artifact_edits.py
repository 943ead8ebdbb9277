"""Artifacts as source + edit log: nested replacements, added/removed/shared modules, no source,
refusals at save time, and version 2 manifests turned into edits."""

from __future__ import annotations

import base64
import json
import zlib

import pytest
import torch
from safetensors.torch import save
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import CheckpointError
from lighten.step import StepContext

X = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))

ATTN_PY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.norm(x + h).mean(1))


def net():
    return Net()
"""


@pytest.fixture
def attn_spec(tmp_path):
    (tmp_path / "attn.py").write_text(ATTN_PY)
    return {"python": f"{tmp_path / 'attn.py'}:net", "input_shape": [6, 16]}


def _ctx(data=None) -> StepContext:
    from lighten.data import DataSpec, load_data
    from lighten.training import TrainConfig

    data = data or load_data(DataSpec(name="synthetic", samples=32, input_shape=[6, 16],
                                      num_classes=3))
    return StepContext(data=data, train_config=TrainConfig(), baseline=None, workdir=None)


def _build(spec):
    from lighten.models import ModelSpec, build_model

    return build_model(ModelSpec(**spec), input_shape=tuple(spec["input_shape"]), num_classes=3)


def _round_trip(model, spec, tmp_path, name="m"):
    path = tmp_path / f"{name}.safetensors"
    save_artifact(model, path, model_spec=spec, input_shape=spec and spec["input_shape"],
                  num_classes=3)
    loaded, manifest = load_artifact(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model.eval()(X), rtol=0, atol=0)
    return loaded, manifest


def test_heads_pruned_then_dynamic_quantized_reloads(attn_spec, tmp_path):
    """The issue's case: a registered module (pruned attention) whose children a later step
    replaced (int8 projections) was rebuilt with float children and did not load."""
    import lighten

    model = _build(attn_spec).eval()
    data = _ctx().data
    pruned, _ = lighten.compress(model, {"prune.heads": {"ratio": 0.5}}, data=data)
    quantized, _ = lighten.compress(pruned, {"quant.dynamic": {}}, data=data)
    kinds = {type(m).__name__ for m in quantized.attn.modules()}
    assert "DynamicQuantLinear" in kinds, kinds
    loaded, manifest = _round_trip(quantized, attn_spec, tmp_path)
    ops = [(e["op"], e["path"]) for e in manifest["edits"]]
    assert ops.index(("module", "attn")) < min(i for i, (op, p) in enumerate(ops)
                                               if p.startswith("attn."))
    assert type(loaded.attn.out_proj).__name__ == "DynamicQuantLinear"


def test_model_without_a_source_is_built_from_its_edits(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(96, 8), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(8, 3)).eval()
    loaded, manifest = _round_trip(model, None, tmp_path)
    assert manifest["model_spec"] is None
    assert [e.get("layer") for e in manifest["edits"]] == [
        "Sequential", "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert loaded[3].p == 0.1


def test_added_removed_and_shared_modules_replay(attn_spec, tmp_path):
    model = _build(attn_spec).eval()
    model.exit = nn.Linear(16, 3)  # an added head (early exit), not in the source
    del model.norm  # a removed child: the forward below no longer uses it
    model.norm = model.exit  # the same object at two paths
    loaded, manifest = _round_trip_forward(model, attn_spec, tmp_path)
    assert loaded.norm is loaded.exit
    assert {"op": "share", "path": "norm", "of": "exit"} in manifest["edits"] or \
        {"op": "share", "path": "exit", "of": "norm"} in manifest["edits"]


def _round_trip_forward(model, spec, tmp_path):
    path = tmp_path / "a.safetensors"
    save_artifact(model, path, model_spec=spec, input_shape=spec["input_shape"], num_classes=3)
    loaded, manifest = load_artifact(path)
    assert list(dict(loaded.named_modules(remove_duplicate=False))) == list(
        dict(model.named_modules(remove_duplicate=False)))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    return loaded, manifest


def test_tied_parameters_are_tied_again(tmp_path):
    emb, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    head.weight = emb.weight  # an LM head tied to its embedding
    model = nn.Sequential(emb, head)
    path = tmp_path / "t.safetensors"
    save_artifact(model, path, model_spec=None)
    loaded, _ = load_artifact(path)
    assert loaded[1].weight is loaded[0].weight


class Unregistered(nn.Module):
    def forward(self, x):
        return x


def test_a_module_that_cannot_be_described_is_refused_at_save(attn_spec, tmp_path):
    model = _build(attn_spec)
    model.head = nn.Sequential(Unregistered(), nn.Linear(16, 3))
    with pytest.raises(CheckpointError, match=r"module 'head\.0'.*Unregistered.*register"):
        save_artifact(model, tmp_path / "x.safetensors", model_spec=attn_spec,
                      input_shape=[6, 16], num_classes=3)
    assert not (tmp_path / "x.safetensors").exists()


def test_corrupt_edit_is_one_clear_error(attn_spec, tmp_path):
    path = tmp_path / "c.safetensors"
    model = _build(attn_spec)
    model.head = nn.Linear(16, 5)
    save_artifact(model, path, model_spec=attn_spec, input_shape=[6, 16], num_classes=3)
    _rewrite(path, lambda m: m["edits"].append({"op": "explode", "path": "head"}))
    with pytest.raises(CheckpointError, match="not a known edit"):
        load_artifact(path)


def _rewrite(path, change) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        envelope = json.loads(f.metadata()["lighten"])
    manifest = json.loads(zlib.decompress(base64.b64decode(envelope["zlib"])))
    change(manifest)
    envelope["zlib"] = base64.b64encode(zlib.compress(json.dumps(manifest).encode())).decode()
    path.write_bytes(save(tensors, metadata={"format": "pt", "lighten": json.dumps(envelope)}))


def test_version_2_manifest_still_loads(attn_spec, tmp_path):
    """Files written before the edit log (modules / shapes / values / resized) load as before."""
    model = _build(attn_spec).eval()
    model.head = nn.Linear(16, 3, bias=False)
    model.norm = nn.LayerNorm(16, eps=1e-3)
    manifest = {
        "format": "lighten-artifact", "version": 2, "model_spec": attn_spec,
        "input_shape": [6, 16], "num_classes": 3, "modules": [], "meta": {}, "tensors": {},
        "shapes": [{"path": "head", "type": "Linear",
                    "attrs": {"in_features": 16, "out_features": 3, "bias": False}},
                   {"path": "norm", "type": "LayerNorm",
                    "attrs": {"normalized_shape": [16], "eps": 1e-3, "elementwise_affine": True,
                              "bias": True}}],
        "values": [{"path": "attn", "name": "dropout", "value": 0.0}],
    }
    text = base64.b64encode(zlib.compress(json.dumps(manifest).encode())).decode()
    envelope = json.dumps({"format": "lighten-artifact", "version": 2, "zlib": text})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "v2.safetensors"
    path.write_bytes(save(state, metadata={"format": "pt", "lighten": envelope}))
    loaded, returned = load_artifact(path)
    assert returned["version"] == 2 and loaded.head.bias is None and loaded.norm.eps == 1e-3
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)


def test_a_users_registered_layer_put_where_the_source_had_another_reloads(attn_spec,
                                                                           tmp_path):
    """A layer with a registered LayerSpec is rebuilt from its constructor arguments, even at a
    path where the source model holds something else."""
    from lighten.layers import LayerSpec, register_layer_spec

    register_layer_spec(LayerSpec(GainLinear, constructor_attrs=("in_features",
                                                                 "out_features")))
    model = _build(attn_spec).eval()
    model.head = GainLinear(16, 3)
    with torch.no_grad():
        model.head.gain.fill_(2.0)
    loaded, manifest = _round_trip(model, attn_spec, tmp_path)
    assert type(loaded.head) is GainLinear
    assert {"op": "module", "path": "head", "layer": "GainLinear",
            "attrs": {"in_features": 16, "out_features": 3}} in manifest["edits"]


class GainLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Linear(in_features, out_features)
        self.gain = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return self.linear(x) * self.gain
