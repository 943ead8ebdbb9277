"""Artifact format 2: compressed manifest, small tensors in one blob; version 1 still loads."""

from __future__ import annotations

import base64
import json
import math
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import nn

from lighten import artifact
from lighten.artifact import TINY_BYTES, describe_artifact, load_artifact, save_artifact
from lighten.codecs import join_tensors, pack_bits, split_tensors
from lighten.errors import CheckpointError

SPEC = {"python": "tests/nowhere.py:net", "input_shape": [1]}


def holder(**tensors: torch.Tensor) -> nn.Module:
    """A module whose state_dict is exactly ``tensors`` (buffers)."""
    m = nn.Module()
    for name, t in tensors.items():
        m.register_buffer(name, t.clone())
    return m


def bn_stack(depth: int = 12, width: int = 20) -> nn.Sequential:
    """Many layers with tiny per-channel tensors: where per-entry overhead used to dominate."""
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return model.eval()


def stored_layout(path) -> tuple[dict, dict, dict]:
    """(safetensors entries, envelope, decompressed manifest) read with nothing but the spec."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        envelope = json.loads(f.metadata()["lighten"])
    manifest = json.loads(zlib.decompress(base64.b64decode(envelope["zlib"])))
    return tensors, envelope, manifest


def test_small_tensors_share_one_entry_and_the_manifest_is_compressed(tmp_path):
    model = bn_stack()
    path = tmp_path / "m.safetensors"
    written = save_artifact(model, path, model_spec=SPEC, input_shape=(16,), num_classes=16)
    tensors, envelope, manifest = stored_layout(path)
    # 12 weights of 1600 bytes stay plain entries; 84 biases/BN tensors share the blob.
    assert sorted(tensors) == sorted([f"{2 * i}.weight" for i in range(12)] + ["#blob"])
    assert (envelope["format"], envelope["version"]) == ("lighten-artifact", 3)
    assert manifest["tensors"] == {}  # every tensor is dense: dtype/shape are stored anyway
    assert len(manifest["blob"]) == len(model.state_dict()) - 12
    plain = len(save(model.state_dict()))  # what safetensors alone needs, no manifest at all
    assert written < plain
    loaded, returned = load_artifact(path, model=bn_stack())
    assert returned["tensors"]["1.running_var"] == {"encoding": "dense", "dtype": "float32",
                                                    "shape": [20]}
    assert "blob" not in returned and returned["version"] == 3
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    rows = {r["name"]: r for r in describe_artifact(path)}
    assert rows["1.num_batches_tracked"]["bytes"] == 8 and rows["0.weight"]["bytes"] == 1600


def test_version_1_file_still_loads(tmp_path):
    """A file as lighten wrote it before the blob: plain JSON manifest, one entry per tensor."""
    w = torch.randn(8, 4)
    sparse = torch.tensor([0.0, 0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 3.0])
    q = torch.tensor([-8, 7, 0, 3, -1, 5], dtype=torch.int8)
    nonzero = sparse != 0
    stored = {"w": w, "s#mask": torch.from_numpy(__import__("numpy").packbits(nonzero.numpy())),
              "s#values": sparse[nonzero], "q#packed": pack_bits(q, bits=4, offset=-8)}
    manifest = {
        "format": "lighten-artifact", "version": 1, "model_spec": SPEC, "input_shape": [1],
        "num_classes": 1, "modules": [], "shapes": [], "meta": {"stage": "old"},
        "tensors": {
            "w": {"encoding": "dense", "dtype": "float32", "shape": [8, 4]},
            "s": {"encoding": "sparse_bitmask", "dtype": "float32", "shape": [9], "nnz": 3},
            "q": {"encoding": "packed_bits", "dtype": "int8", "shape": [6], "bits": 4,
                  "offset": -8},
            "w2": {"encoding": "alias", "of": "w", "dtype": "float32", "shape": [8, 4]},
        },
    }
    path = tmp_path / "old.safetensors"
    save_file(stored, path, metadata={"format": "pt", "lighten": json.dumps(manifest)})
    skeleton = holder(w=torch.zeros(8, 4), s=torch.zeros(9), q=torch.zeros(6, dtype=torch.int8))
    skeleton.register_buffer("w2", skeleton.w)  # tied, as when saved
    loaded, returned = load_artifact(path, model=skeleton)
    assert torch.equal(loaded.w, w) and torch.equal(loaded.s, sparse) and torch.equal(loaded.q, q)
    assert loaded.w2 is loaded.w
    assert returned["version"] == 1 and returned["tensors"] == manifest["tensors"]
    rows = {r["name"]: r["bytes"] for r in describe_artifact(path)}
    assert rows == {"w": 128, "s": 2 + 12, "q": 3, "w2": 0}


def test_large_tensors_stay_plain_entries_and_tiny_ones_go_in_the_blob(tmp_path):
    big = torch.randn(TINY_BYTES // 4 + 1)  # one float over the threshold
    edge = torch.randn(TINY_BYTES // 4)  # exactly TINY_BYTES
    path = tmp_path / "e.safetensors"
    save_artifact(holder(big=big, edge=edge), path, model_spec=SPEC, input_shape=(1,),
                  num_classes=1)
    tensors, _, manifest = stored_layout(path)
    assert sorted(tensors) == ["#blob", "big"]
    assert torch.equal(tensors["big"], big)
    assert manifest["blob"] == [["edge", "float32", [TINY_BYTES // 4]]]
    assert torch.equal(tensors["#blob"].view(torch.float32), edge)  # raw little-endian bytes


def test_newer_envelope_is_refused_before_decompressing(tmp_path):
    path = tmp_path / "future.safetensors"
    envelope = {"format": "lighten-artifact", "version": 4, "zlib": "not even base64!"}
    save_file({"x": torch.zeros(1)}, path, metadata={"lighten": json.dumps(envelope)})
    with pytest.raises(CheckpointError, match="version 4, newer than .* upgrade lighten"):
        load_artifact(path, model=holder(x=torch.zeros(1)))


def _with_zlib(tmp_path, packed) -> Path:
    path = tmp_path / "bad.safetensors"
    envelope = {"format": "lighten-artifact", "version": 2, "zlib": packed}
    save_file({"x": torch.zeros(1)}, path, metadata={"lighten": json.dumps(envelope)})
    return path


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


GOOD = zlib.compress(json.dumps({"format": "lighten-artifact", "version": 2}).encode(), 9)
CORRUPT = [
    ("not base64 at all!", "corrupt compressed manifest"),
    (_b64(b"plain bytes, no zlib header"), "corrupt compressed manifest .*Error -3"),
    (_b64(GOOD[: len(GOOD) // 2]), "corrupt compressed manifest .*truncated"),
    (_b64(zlib.compress(b"{not json")), "corrupt compressed manifest"),
    (_b64(zlib.compress(b"\xff\xfe")), "corrupt compressed manifest"),
    (_b64(zlib.compress(b"[1, 2]")), "not a lighten artifact"),
    (_b64(GOOD), "manifest lacks a valid 'model_spec'"),
    (17, "corrupt compressed manifest .*not text"),
]


@pytest.mark.parametrize(("packed", "match"), CORRUPT)
def test_corrupt_compressed_manifest_is_one_line(tmp_path, packed, match):
    path = _with_zlib(tmp_path, packed)
    with pytest.raises(CheckpointError, match=match) as info:
        load_artifact(path, model=holder(x=torch.zeros(1)))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_zlib_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "_MAX_MANIFEST_BYTES", 4096)
    path = _with_zlib(tmp_path, _b64(zlib.compress(b" " * 100_000, 9)))
    with pytest.raises(CheckpointError, match="inflates past 4096 bytes"):
        load_artifact(path, model=holder(x=torch.zeros(1)))


def _forge(path, edit_tensors=None, edit_manifest=None) -> None:
    tensors, envelope, manifest = stored_layout(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    envelope["zlib"] = _b64(zlib.compress(json.dumps(manifest).encode()))
    save_file(tensors, path, metadata={"lighten": json.dumps(envelope)})


@pytest.mark.parametrize(("edit_tensors", "edit_manifest", "match"), [
    (lambda t: t.pop("#blob"), None, "lacks stored tensor '#blob'"),
    (lambda t: t.update({"#blob": t["#blob"][:-1].clone()}), None, "ends at byte .* past"),
    (lambda t: t.update({"#blob": t["#blob"].float()}), None, "not 1-D uint8"),
    (None, lambda m: m["blob"].append(m["blob"][0]), "listed twice"),
    (None, lambda m: m["blob"][0].__setitem__(1, "Tensor"), "is not \\[key, dtype, shape\\]"),
    (None, lambda m: m["blob"].pop(), "covers .* of the blob's"),
    (None, lambda m: m.update(blob={"a": 1}), "lacks a valid 'blob'"),
    (lambda t: t.update(a=torch.zeros(3)), None, "stores 'a' twice"),
])
def test_corrupt_blob_is_one_line(tmp_path, edit_tensors, edit_manifest, match):
    path = tmp_path / "b.safetensors"
    tensors = {"a": torch.randn(3), "b": torch.arange(5), "c": torch.randn(600)}
    save_artifact(holder(**tensors), path, model_spec=SPEC, input_shape=(1,), num_classes=1)
    _forge(path, edit_tensors, edit_manifest)
    with pytest.raises(CheckpointError, match=match) as info:
        load_artifact(path, model=holder(**tensors))
    assert "\n" not in str(info.value)


def test_short_header_is_not_mistaken_for_a_pickle(tmp_path):
    """A safetensors header of 0x0280..0x05ff bytes starts 0x80 0x02..0x05, like a pickle."""
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x80\x02\x00\x00\x00")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_artifact(path, model=holder(x=torch.zeros(1)))
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"x": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_artifact(legacy, model=holder(x=torch.zeros(1)))


def test_blob_key_in_state_dict_is_refused(tmp_path):
    model = nn.Module()
    model.register_buffer("#blob", torch.zeros(2))
    with pytest.raises(CheckpointError, match="'#blob' clashes"):
        save_artifact(model, tmp_path / "x.safetensors", model_spec=SPEC, input_shape=(1,),
                      num_classes=1)


# ----------------------------------------------------------------------------- exactness


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool]


def make_tensor(dtype, shape, kind, seed) -> torch.Tensor:
    """Raw random bits (NaN payloads, -0.0, subnormals), mostly zeros, or few-bit integers."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g).bool()
    elif kind == "lowbit" and not dtype.is_floating_point:
        low = 0 if dtype == torch.uint8 else -4
        t = torch.randint(low, low + 8, (n,), generator=g).to(dtype)
    else:
        t = torch.randint(0, 256, (n * dtype.itemsize,), generator=g, dtype=torch.uint8)
        t = t.view(dtype).clone()
    if kind == "sparse":
        t[torch.rand(n, generator=g) < 0.9] = 0
    return t.reshape(shape)


def assert_bit_exact(original: torch.Tensor, back: torch.Tensor) -> None:
    """Bit for bit, except that a -0.0 may come back +0.0 (an equal value) from a sparse mask."""
    assert back.dtype == original.dtype and back.shape == original.shape
    zeroed = torch.where(original == 0, torch.zeros((), dtype=original.dtype), original)

    def rows(t):  # (numel, itemsize) raw bytes
        return t.contiguous().reshape(-1).view(torch.uint8).reshape(-1, t.element_size())

    same = (rows(back) == rows(original)).all(1) | (rows(back) == rows(zeroed)).all(1)
    assert bool(same.all())


def check_round_trip(specs) -> None:
    tensors = {f"t{i}": make_tensor(*spec) for i, spec in enumerate(specs)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.safetensors"
        save_artifact(holder(**tensors), path, model_spec=SPEC, input_shape=(1,), num_classes=1)
        skeleton = holder(**{k: torch.zeros_like(v) for k, v in tensors.items()})
        loaded, _ = load_artifact(path, model=skeleton)
    for name, t in tensors.items():
        assert_bit_exact(t, getattr(loaded, name))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_in_and_out_of_the_blob(dtype):
    check_round_trip([(dtype, (), "random", 0), (dtype, (0, 3), "random", 1),
                      (dtype, (5, 7), "sparse", 2), (dtype, (40, 40), "random", 3),
                      (dtype, (50, 41), "sparse", 4), (dtype, (30, 33), "lowbit", 5)])


def test_join_and_split_are_inverse():
    parts = {"a": torch.randn(3, 2).to(torch.bfloat16), "b": torch.tensor(True),
             "c": torch.zeros(0, 4, dtype=torch.int64), "d": torch.arange(7, dtype=torch.int16)}
    blob, index = join_tensors(parts)
    assert blob.dtype == torch.uint8 and blob.numel() == sum(t.nbytes for t in parts.values())
    assert index[0] == ["a", "bfloat16", [3, 2]]
    back = split_tensors(blob, index)
    assert list(back) == list(parts)
    for k, t in parts.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    with pytest.raises(ValueError, match="not \\[key, dtype, shape\\]"):
        split_tensors(torch.zeros(4, dtype=torch.uint8), [["q", "qint8", [4]]])
    with pytest.raises(ValueError, match="not plain values"):
        join_tensors({"z": torch.zeros(2, dtype=torch.complex128)})


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is in the `test` extra; the parametrized cases above still run
    pass
else:
    TENSOR = st.tuples(st.sampled_from(DTYPES),
                       st.lists(st.integers(0, 12), max_size=3).map(tuple),
                       st.sampled_from(["random", "sparse", "lowbit"]),
                       st.integers(0, 2**16))

    @settings(max_examples=40, deadline=None)
    @given(st.lists(TENSOR, min_size=1, max_size=5))
    def test_any_state_dict_round_trips_bit_for_bit(specs):
        check_round_trip(specs)
