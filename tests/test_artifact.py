"""The artifact format: exact round trips, sparse/int8 storage, custom/pruned modules, errors."""

from __future__ import annotations

import base64
import json
import math
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import nn

from lighten import provenance
from lighten.artifact import (
    artifact_bytes,
    describe_artifact,
    load_artifact,
    save_artifact,
)
from lighten.codecs import pack_bitmask, unpack_bitmask
from lighten.errors import CheckpointError, ModelError
from lighten.modules import (
    get_module_type,
    get_submodule,
    module_type_key,
    register_module_type,
    registered_key,
    set_submodule,
)

SPEC = {"python": "tests/nowhere.py:small_cnn", "input_shape": [1, 8, 8]}
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class SmallCNN(nn.Module):
    def __init__(self, c1: int = 8, c2: int = 12, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@register_module_type
class Int8Linear(nn.Module):
    """A weight-only int8 linear layer: the kind of custom module quantization produces."""

    artifact_type = "test:Int8Linear"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features)
        scale = linear.weight.detach().abs().amax(dim=1).clamp_min(1e-8) / 127
        q.qweight.copy_(torch.round(linear.weight.detach() / scale[:, None]).to(torch.int8))
        q.scale.copy_(scale)
        q.bias.data.copy_(linear.bias.detach())
        return q

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale[:, None]).t() + self.bias

    def artifact_config(self) -> dict:
        return {"in_features": self.qweight.shape[1], "out_features": self.qweight.shape[0]}

    @classmethod
    def from_artifact(cls, config: dict) -> Int8Linear:
        return cls(config["in_features"], config["out_features"])


def randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random weights and BN statistics, so a reload into a fresh skeleton is a real test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.1)
    return model.eval()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_dense_round_trip_is_exact(tmp_path):
    model = randomized(SmallCNN())
    path = tmp_path / "m.safetensors"
    written = save_artifact(model, path, model_spec=SPEC, input_shape=(1, 8, 8), num_classes=10,
                            meta={"stage": "baseline"})
    assert written == path.stat().st_size == artifact_bytes(path)
    loaded, manifest = load_artifact(path, model=SmallCNN())
    assert_same_state(model, loaded)
    assert torch.equal(model(X), loaded(X))
    assert not loaded.training
    assert manifest["format"] == "lighten-artifact" and manifest["version"] == 3
    assert manifest["meta"] == {"stage": "baseline"} and manifest["input_shape"] == [1, 8, 8]
    assert {e["encoding"] for e in manifest["tensors"].values()} == {"dense"}
    rows = describe_artifact(path)
    assert sum(r["bytes"] for r in rows) == sum(t.nbytes for t in model.state_dict().values())
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def zero_fraction_(t: torch.Tensor, fraction: float, seed: int = 0) -> None:
    idx = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(seed))
    t.view(-1)[idx[: int(fraction * t.numel())]] = 0


def test_sparse_bitmask_is_chosen_for_80_percent_zeros(tmp_path):
    model = randomized(nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)))
    dense_path, sparse_path = tmp_path / "dense.safetensors", tmp_path / "sparse.safetensors"
    dense = save_artifact(model, dense_path, model_spec=SPEC, input_shape=(128,), num_classes=10)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            zero_fraction_(layer.weight, 0.8)
    sparse = save_artifact(model, sparse_path, model_spec=SPEC, input_shape=(128,),
                           num_classes=10)
    assert sparse < 0.35 * dense
    encodings = {r["name"]: r["encoding"] for r in describe_artifact(sparse_path)}
    assert encodings["0.weight"] == encodings["2.weight"] == "sparse_bitmask"
    assert encodings["0.bias"] == "dense"  # no zeros: dense is smaller
    skeleton = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    loaded, _ = load_artifact(sparse_path, model=skeleton)
    assert_same_state(model, loaded)


def test_int8_stays_int8_and_sparse_int8_is_chosen(tmp_path):
    g = torch.Generator().manual_seed(0)
    q = Int8Linear.from_linear(randomized(nn.Linear(64, 32)))
    model = nn.Sequential(q)
    path = tmp_path / "q.safetensors"
    save_artifact(model, path, model_spec=SPEC, input_shape=(64,), num_classes=32)
    row = next(r for r in describe_artifact(path) if r["name"] == "0.qweight")
    assert (row["encoding"], row["dtype"], row["bytes"]) == ("dense", "int8", 64 * 32)
    loaded, _ = load_artifact(path, model=nn.Sequential(nn.Linear(64, 32)))
    assert loaded[0].qweight.dtype == torch.int8
    assert_same_state(model, loaded)

    zero_fraction_(q.qweight, 0.8)
    q.qweight[q.qweight == 0] = 0
    q.qweight[q.qweight != 0] = torch.randint(1, 127, (int((q.qweight != 0).sum()),),
                                              generator=g, dtype=torch.int8)
    save_artifact(model, path, model_spec=SPEC, input_shape=(64,), num_classes=32)
    row = next(r for r in describe_artifact(path) if r["name"] == "0.qweight")
    nnz = int((q.qweight != 0).sum())
    assert row["encoding"] == "sparse_bitmask"
    assert row["bytes"] == math.ceil(64 * 32 / 8) + nnz  # mask bits + one byte per value
    loaded, _ = load_artifact(path, model=nn.Sequential(nn.Linear(64, 32)))
    assert loaded[0].qweight.dtype == torch.int8
    assert_same_state(model, loaded)


def test_registered_custom_module_round_trips(tmp_path):
    model = randomized(SmallCNN())
    model.head = Int8Linear.from_linear(model.head)
    path = tmp_path / "c.safetensors"
    save_artifact(model, path, model_spec=SPEC, input_shape=(1, 8, 8), num_classes=10)
    loaded, manifest = load_artifact(path, model=SmallCNN())
    assert type(loaded.head) is Int8Linear
    assert {"op": "module", "path": "head", "type": "test:Int8Linear",
            "config": {"in_features": 12, "out_features": 10}} in manifest["edits"]
    assert_same_state(model, loaded)
    assert torch.equal(model(X), loaded(X))


def shrink(model: SmallCNN, keep: list[int]) -> SmallCNN:
    """Structured pruning by hand: keep some conv1 channels, with matching BN and conv2."""
    conv1, bn1, conv2 = model.features[0], model.features[1], model.features[3]
    new1 = nn.Conv2d(1, len(keep), 3, padding=1)
    new_bn = nn.BatchNorm2d(len(keep))
    new2 = nn.Conv2d(len(keep), conv2.out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        new1.weight.copy_(conv1.weight[keep])
        new1.bias.copy_(conv1.bias[keep])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).copy_(getattr(bn1, name)[keep])
        new2.weight.copy_(conv2.weight[:, keep])
    model.features[0], model.features[1], model.features[3] = new1, new_bn, new2
    return model.eval()


def test_shrunk_model_reloads_into_full_size_skeleton(tmp_path):
    model = shrink(randomized(SmallCNN()), keep=[0, 2, 3, 7, 5])
    path = tmp_path / "p.safetensors"
    save_artifact(model, path, model_spec=SPEC, input_shape=(1, 8, 8), num_classes=10)
    loaded, manifest = load_artifact(path, model=SmallCNN())
    assert loaded.features[0].out_channels == 5 and loaded.features[3].in_channels == 5
    assert loaded.features[1].num_features == 5 and loaded.features[3].bias is None
    assert_same_state(model, loaded)
    assert torch.equal(model(X), loaded(X))
    recorded = {e["path"]: e for e in manifest["edits"] if e["op"] == "module"}
    assert recorded["features.0"]["attrs"]["out_channels"] == 5
    assert recorded["features.0"]["attrs"]["kernel_size"] == [3, 3]


def test_pruned_lenet5_reloads_from_model_spec(tmp_path):
    import lighten.models as zoo
    spec = {"zoo": "lenet5"}
    model = zoo.build_model(zoo.ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10)
    model = randomized(model)
    model.features[4] = nn.Identity()  # a ReLU replaced by a standard shapeless module
    model.features[3] = nn.Conv2d(6, 4, 5, padding=2)  # pruned from 16 to 4 output channels
    model.classifier[1] = nn.Linear(4 * 2 * 2, 120)  # 8x8 input: 2x2 maps after two pools
    model = randomized(model, seed=3)
    x = torch.randn(3, 1, 8, 8)
    path = tmp_path / "lenet.safetensors"
    save_artifact(model, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)
    _, manifest = load_artifact(path, model=zoo.build_model(
        zoo.ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10))
    # Only the layers that differ from a fresh lenet5 are recorded.
    assert [e["path"] for e in manifest["edits"]] == ["features.3", "features.4", "classifier.1"]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    loaded, _ = load_artifact(path)  # built from model_spec, no skeleton given
    save_artifact(model, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)
    assert torch.equal(torch.rand(3), expected_next)  # building the spec left the RNG alone
    assert_same_state(model, loaded)
    assert torch.equal(model.eval()(x), loaded(x))


NET_PY = """
from torch import nn

def net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
"""


def test_identity_replacing_batchnorm_and_conv_gaining_bias(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    spec = {"python": f"{tmp_path / 'net.py'}:net", "input_shape": [1, 8, 8]}
    model = randomized(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(8, 10)))
    model[0] = nn.Conv2d(1, 8, 3, padding=1, bias=True)  # BN folded into the conv before it
    model[1] = nn.Identity()
    model = randomized(model, seed=5)
    path = tmp_path / "f.safetensors"
    save_artifact(model, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)
    loaded, manifest = load_artifact(path)  # the original (unfolded) net built from the spec
    assert {e["path"]: e["layer"] for e in manifest["edits"]} == {"0": "Conv2d", "1": "Identity"}
    assert type(loaded[1]) is nn.Identity and loaded[0].bias is not None
    assert_same_state(model, loaded)
    assert torch.equal(model(X), loaded(X))


def test_tied_tensors_are_stored_once(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False))
    model[1].weight = model[0].weight
    path = tmp_path / "t.safetensors"
    save_artifact(model, path, model_spec=SPEC, input_shape=(32,), num_classes=32)
    rows = {r["name"]: r for r in describe_artifact(path)}
    assert rows["0.weight"]["bytes"] == 32 * 32 * 4 and rows["1.weight"]["encoding"] == "alias"
    assert rows["1.weight"]["bytes"] == 0
    skeleton = nn.Sequential(nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False))
    skeleton[1].weight = skeleton[0].weight
    loaded, _ = load_artifact(path, model=skeleton)
    assert loaded[1].weight is loaded[0].weight
    assert torch.equal(loaded[1].weight, model[0].weight)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_artifact(randomized(SmallCNN()), path, model_spec=SPEC, input_shape=(1, 8, 8),
                  num_classes=10)
    return path


def read_stored_manifest(path) -> tuple[dict, dict]:
    """(stored tensors, manifest as stored): the documented envelope, decoded by hand."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        envelope = json.loads(f.metadata()["lighten"])
    assert set(envelope) == {"format", "version", "zlib"}
    return tensors, json.loads(zlib.decompress(base64.b64decode(envelope["zlib"])))


def write_stored_manifest(path, tensors: dict, manifest: dict) -> None:
    text = base64.b64encode(zlib.compress(json.dumps(manifest).encode())).decode()
    envelope = {"format": manifest["format"], "version": manifest["version"], "zlib": text}
    save_file(tensors, path, metadata={"lighten": json.dumps(envelope)})


def rewrite_manifest(path, edit) -> None:
    """Re-save ``path`` with ``edit(manifest)`` applied: forge a file from the future or a bug."""
    tensors, manifest = read_stored_manifest(path)
    edit(manifest)
    write_stored_manifest(path, tensors, manifest)


def expect_error(match: str, path, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_artifact(path, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    expect_error("does not exist", tmp_path / "nope.safetensors", model=SmallCNN())
    with pytest.raises(CheckpointError, match="does not exist"):
        artifact_bytes(tmp_path / "nope.safetensors")


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    expect_error("truncated or corrupt", saved, model=SmallCNN())
    saved.write_bytes(data[:5])
    expect_error("truncated or corrupt", saved, model=SmallCNN())


def test_plain_safetensors_is_not_an_artifact(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(SmallCNN().state_dict(), path)
    expect_error("not a lighten artifact.*load_weights", path, model=SmallCNN())


@pytest.mark.parametrize("name", ["m.pt", "disguised.safetensors"])
def test_pickle_file_is_refused(tmp_path, name):
    path = tmp_path / name
    torch.save(SmallCNN().state_dict(), path)
    expect_error("never unpickles", path, model=SmallCNN())


def test_newer_manifest_version(saved):
    rewrite_manifest(saved, lambda m: m.update(version=99))
    expect_error("version 99, newer than .* upgrade lighten", saved, model=SmallCNN())


def test_unknown_module_type(saved):
    rewrite_manifest(saved, lambda m: m["edits"].append(
        {"op": "module", "path": "head", "type": "someext:FancyConv", "config": {}}))
    message = expect_error("unknown module type 'someext:FancyConv'", saved, model=SmallCNN())
    assert "newer lighten" in message and "test:Int8Linear" in message


def test_tensor_shape_mismatch_in_manifest(saved):
    entry = {"encoding": "dense", "dtype": "float32", "shape": [11]}  # head.bias holds 10
    rewrite_manifest(saved, lambda m: m["tensors"].update({"head.bias": entry}))
    expect_error("'head.bias' is .* manifest says", saved, model=SmallCNN())


def test_blob_index_that_does_not_fit_the_blob(saved):
    def grow_bias(manifest):
        row = next(r for r in manifest["blob"] if r[0] == "head.bias")
        row[2] = [11]

    rewrite_manifest(saved, grow_bias)
    expect_error("blob of small tensors is corrupt", saved, model=SmallCNN())


def test_model_that_does_not_fit(saved):
    other = nn.Sequential(nn.Linear(4, 4))
    expect_error("no module 'features'", saved, model=other)
    bigger = SmallCNN()
    bigger.extra = nn.Linear(2, 2)
    expect_error("does not fit SmallCNN: missing 'extra.weight'", saved, model=bigger)


def test_failed_save_leaves_existing_file_intact(saved, monkeypatch):
    before = saved.read_bytes()
    with pytest.raises(CheckpointError, match="not JSON"):
        save_artifact(SmallCNN(), saved, model_spec=SPEC, input_shape=(1, 8, 8), num_classes=10,
                      meta={"bad": object()})
    assert saved.read_bytes() == before

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(provenance.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(SmallCNN(), saved, model_spec=SPEC, input_shape=(1, 8, 8), num_classes=10)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_non_tensor_state_is_refused(tmp_path):
    class WithExtra(nn.Linear):
        def get_extra_state(self):
            return {"note": "x"}

        def set_extra_state(self, state):
            pass

    with pytest.raises(CheckpointError, match="artifacts hold tensors only"):
        save_artifact(WithExtra(2, 2), tmp_path / "x.safetensors", model_spec=SPEC,
                      input_shape=(2,), num_classes=2)


def test_a_model_spec_a_load_could_not_build_is_refused_at_save_time(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match="model_spec .*model.python needs model.input_shape"):
        save_artifact(model, tmp_path / "a.safetensors", model_spec={"python": "net.py:build"})
    assert not (tmp_path / "a.safetensors").exists()
    with pytest.raises(CheckpointError, match="model_spec .*zoo"):
        save_artifact(model, tmp_path / "a.safetensors", model_spec={"zoo": 5},
                      input_shape=(4,), num_classes=2)


def test_the_input_shape_comes_from_the_spec_or_the_task_when_not_given(tmp_path):
    from lighten.artifact import _read_manifest
    from lighten.task import ClassificationTask

    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build(num_classes=2, "
                                     "input_shape=(4,)):\n    return nn.Linear(4, num_classes)\n")
    source = f"{tmp_path / 'net.py'}:build"
    path = tmp_path / "a.safetensors"
    save_artifact(nn.Linear(4, 2), path, model_spec={"python": source}, num_classes=2,
                  task=ClassificationTask((4,), 2))
    manifest = _read_manifest(path)
    assert manifest["input_shape"] == [4] and manifest["model_spec"]["input_shape"] == [4]
    loaded, _ = load_artifact(path, trust=True)
    assert loaded(torch.ones(1, 4)).shape == (1, 2)


# ----------------------------------------------------------------------------- sparse property


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


SPECIALS = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45])
CASES = [(dtype, shape, density, seed)
         for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                       torch.uint8, torch.int32, torch.int64, torch.bool)
         for shape, density, seed in (((0,), 0.5, 0), ((), 1.0, 1), ((7,), 0.3, 2),
                                      ((3, 5, 9), 0.2, 3), ((64, 9), 0.0, 4), ((33,), 1.0, 5))]


def random_tensor(dtype, shape, density, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.ones(shape, dtype=torch.bool)
    elif dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
        flat = t.view(-1)
        flat[: min(len(SPECIALS), flat.numel())] = SPECIALS[: flat.numel()].to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g,
                          dtype=torch.int64).to(dtype)
    keep = torch.rand(shape, generator=g) < density
    return torch.where(keep, t, torch.zeros((), dtype=dtype))


def check_sparse_round_trip(t: torch.Tensor) -> None:
    mask, values = pack_bitmask(t)
    assert mask.dtype == torch.uint8 and mask.numel() == math.ceil(t.numel() / 8)
    assert values.dtype == t.dtype
    back = unpack_bitmask(mask, values, dtype=t.dtype, shape=t.shape)
    assert back.shape == t.shape and back.dtype == t.dtype
    positive_zeros = torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)
    assert _bits(back) == _bits(positive_zeros)  # bit-exact, NaN payloads too; -0.0 -> +0.0


def test_negative_zeros_from_masking_count_as_zeros():
    w = -torch.rand(1000) * (torch.arange(1000) % 5 == 0)  # pruning by multiply: 80% are -0.0
    mask, values = pack_bitmask(w)
    assert values.numel() == 200 - int((w[::5] == 0).sum())
    assert torch.equal(unpack_bitmask(mask, values, dtype=w.dtype, shape=w.shape), w)


@pytest.mark.parametrize(("dtype", "shape", "density", "seed"), CASES)
def test_sparse_encoding_round_trips_exactly(dtype, shape, density, seed):
    check_sparse_round_trip(random_tensor(dtype, shape, density, seed))


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is in the `test` extra; the parametrized cases above still run
    pass
else:

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.floats(allow_nan=True, width=32) | st.just(0.0), max_size=200))
    def test_sparse_encoding_round_trips_any_float_tensor(values):
        check_sparse_round_trip(torch.tensor(values, dtype=torch.float32))


def test_sparse_tensor_round_trips_through_a_file(tmp_path):
    model = nn.Module()
    t = random_tensor(torch.float32, (40, 40), 0.1, 7)
    model.register_buffer("t", t.clone())
    path = tmp_path / "s.safetensors"
    save_artifact(model, path, model_spec=SPEC, input_shape=(1,), num_classes=1)
    skeleton = nn.Module()
    skeleton.register_buffer("t", torch.ones(40, 40))
    loaded, manifest = load_artifact(path, model=skeleton)
    assert manifest["tensors"]["t"]["encoding"] == "sparse_bitmask"
    assert _bits(loaded.t) == _bits(torch.where(t == 0, torch.zeros(()), t))


# ----------------------------------------------------------------------------- modules registry


def test_submodule_paths_include_sequential_indices():
    model = SmallCNN()
    assert get_submodule(model, "features.3") is model.features[3]
    assert get_submodule(model, "") is model
    new = nn.Conv2d(8, 12, 1)
    set_submodule(model, "features.3", new)
    assert model.features[3] is new
    with pytest.raises(ModelError, match="no child '9'"):
        get_submodule(model, "features.9")
    with pytest.raises(ModelError, match="no child 'missing'"):
        set_submodule(model, "missing", nn.ReLU())


def test_module_type_keys_and_lookup():
    assert module_type_key(Int8Linear) == "test:Int8Linear"
    assert get_module_type("test:Int8Linear") is Int8Linear
    assert registered_key(Int8Linear(2, 2)) == "test:Int8Linear"
    assert registered_key(nn.Linear(2, 2)) is None
    with pytest.raises(CheckpointError, match="unknown module type 'lighten.nothing:X'"):
        get_module_type("lighten.nothing:X")

    class NoConfig(nn.Module):
        pass

    with pytest.raises(TypeError, match="artifact_config"):
        register_module_type(NoConfig)

    @register_module_type
    class Plain(nn.Module):
        def artifact_config(self):
            return {}

        @classmethod
        def from_artifact(cls, config):
            return cls()

    assert module_type_key(Plain).endswith(":test_module_type_keys_and_lookup.<locals>.Plain")

    class Clash(Plain):
        artifact_type = "test:Int8Linear"

    with pytest.raises(RuntimeError, match="registered twice"):
        register_module_type(Clash)


def test_bytes_roundtrip_of_plain_save_matches_safetensors(tmp_path):
    """The file is plain safetensors: other tools read the large tensors without lighten."""
    model = randomized(SmallCNN(c1=16, c2=32))
    path = tmp_path / "m.safetensors"
    save_artifact(model, path, model_spec=SPEC, input_shape=(1, 8, 8), num_classes=10)
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor("features.3.weight"), model.features[3].weight)
        assert torch.equal(f.get_tensor("head.weight"), model.head.weight)  # 1280 bytes
        assert "head.bias" not in f.keys()  # 40 bytes: in the blob
    # 13 tensors, 4 safetensors entries: smaller than a plain save despite the manifest.
    assert path.stat().st_size < len(save(model.state_dict()))
