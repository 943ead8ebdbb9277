"""A corpus of malformed safetensors files and lighten artifacts, generated from two good ones.

``build_corpus(folder)`` returns ``[(name, path)]``: byte-level damage to a plain safetensors
state dict and to an artifact that uses every stored encoding (header length past the end or
huge, non-JSON headers, overlapping / gapped / out-of-range offsets, dtype x shape that is not
the byte length, duplicate keys, trailing bytes, truncation, bit flips), and manifest-level lies
in the artifact (encodings, dtypes, shapes, bit widths, blob index, edit log, versions, zlib,
model spec), plus NaN/Inf weights. Every case must give a LightenError or load; nothing else.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from lighten.artifact import METADATA_KEY, _read_manifest, save_artifact


def tiny_model() -> nn.Module:
    """Every encoding: sparse float, packed and sparse-packed ints, an alias, the blob, dense."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 10),
                      nn.Linear(32, 32))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        m[0].weight[:, ::2] = 0
    m[4].weight = m[2].weight
    m[2].register_buffer("q", torch.randint(0, 4, (32, 32), generator=g, dtype=torch.int8))
    s = torch.randint(1, 4, (64, 32), generator=g, dtype=torch.int8)
    s[torch.rand(64, 32, generator=g) < 0.8] = 0
    m[3].register_buffer("sq", s)
    return m


def skeleton() -> nn.Module:
    """The architecture of :func:`tiny_model` with other values (what load_weights fills)."""
    m = tiny_model()
    with torch.no_grad():
        for t in m.state_dict().values():
            t.zero_()
    return m


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, *, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def _with_manifest(base: bytes, manifest) -> bytes:
    """``base`` with its manifest replaced (compressed the way save_artifact stores it)."""
    header, body = split(base)
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    packed = base64.b64encode(zlib.compress(raw, 9)).decode()
    header["__metadata__"][METADATA_KEY] = json.dumps(
        {"format": "lighten-artifact", "version": 3, "zlib": packed})
    return join(header, body)


def _with_envelope(base: bytes, envelope: str) -> bytes:
    header, body = split(base)
    header["__metadata__"][METADATA_KEY] = envelope
    return join(header, body)


def _safetensors_cases(base: bytes, rng: random.Random) -> dict[str, bytes]:
    header, body = split(base)
    n = len(json.dumps(header).encode())
    cases: dict[str, bytes] = {}
    for length in (0, 1, 7, n - 1, n + 1, len(base), len(base) + 1, 2**32, 2**63 - 1,
                   2**64 - 1, 100_000_001):
        cases[f"header-length-{length}"] = join(header, body, length=length)
    for cut in sorted({0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(base) // 2,
                       len(base) - 1}):
        cases[f"truncated-at-{cut}"] = base[:cut]
    for name, text in {"empty": b"", "open-brace": b"{", "array": b"[]", "null": b"null",
                       "number": b"1", "string": b'"x"', "bad-utf8": b'{"\xff":1}',
                       "nul-padded": json.dumps(header).encode() + b"\x00" * 5,
                       "garbage-after": json.dumps(header).encode() + b"}}",
                       "deep-nesting": b"[" * 100_000 + b"]" * 100_000}.items():
        cases[f"header-{name}"] = join(text, body)
    keys = sorted(k for k in header if k != "__metadata__")
    first, second = keys[0], keys[-1]
    end = len(body)
    for key in (first, second):
        entry = header[key]
        begin, stop = entry["data_offsets"]
        edits = {
            "begin+1": [begin + 1, stop], "end+1": [begin, stop + 1], "end-1": [begin, stop - 1],
            "empty-range": [begin, begin], "reversed": [stop, begin], "past-end": [begin, end + 1],
            "huge-end": [begin, 2**64 - 1], "negative": [-1, stop], "strings": ["0", "8"],
            "floats": [begin + 0.5, stop], "one-number": [begin], "null": None,
        }
        for name, offsets in edits.items():
            changed = json.loads(json.dumps(header))
            changed[key]["data_offsets"] = offsets
            cases[f"offsets-{name}/{key}"] = join(changed, body)
        for name, dtype in {"unknown": "X9", "wider": "F64", "narrower": "U8", "bool": "BOOL",
                            "number": 4, "lowercase": "f32"}.items():
            changed = json.loads(json.dumps(header))
            changed[key]["dtype"] = dtype
            cases[f"dtype-{name}/{key}"] = join(changed, body)
        shape = entry["shape"]
        for name, new in {"bigger": [*shape[:-1], shape[-1] + 1] if shape else [2],
                          "scalar": [], "overflow": [2**62, 2**62], "negative": [-1],
                          "string": ["a"], "many-dims": [1] * 64 + list(shape),
                          "zero": [0]}.items():
            changed = json.loads(json.dumps(header))
            changed[key]["shape"] = new
            cases[f"shape-{name}/{key}"] = join(changed, body)
    changed = json.loads(json.dumps(header))
    changed[second]["data_offsets"] = list(header[first]["data_offsets"])
    cases["offsets-overlapping"] = join(changed, body)
    changed = json.loads(json.dumps(header))
    for key in keys:  # every tensor moved 8 bytes on: a gap at the start, the end cut
        b, e = changed[key]["data_offsets"]
        changed[key]["data_offsets"] = [b + 8, min(e + 8, end + 8)]
    cases["offsets-gap"] = join(changed, body + bytes(8))
    text = json.dumps(header).encode()
    dup = json.dumps({first: header[second]}).encode()[1:-1]
    cases["duplicate-key"] = join(text[:-1] + b"," + dup + b"}", body)
    dup_meta = b'"__metadata__":{"format":"pt"}'
    cases["duplicate-metadata"] = join(text[:-1] + b"," + dup_meta + b"}", body)
    for extra in (1, 7, 8, 4096):
        cases[f"trailing-{extra}-bytes"] = base + bytes(extra)
    for name, meta in {"list": ["x"], "number-value": {"format": 1}, "nested": {"a": {"b": 1}},
                       "null": None}.items():
        changed = json.loads(json.dumps(header))
        changed["__metadata__"] = meta
        cases[f"metadata-{name}"] = join(changed, body)
    for _ in range(30):  # single bit flips anywhere in the file
        pos = rng.randrange(len(base) * 8)
        flipped = bytearray(base)
        flipped[pos // 8] ^= 1 << (pos % 8)
        cases[f"bit-flip-{pos}"] = bytes(flipped)
    return cases


def _manifest_cases(base: bytes, manifest: dict) -> dict[str, bytes]:
    cases: dict[str, bytes] = {}

    def lie(name: str, change) -> None:
        changed = json.loads(json.dumps(manifest))
        change(changed)
        cases[f"manifest-{name}"] = _with_manifest(base, changed)

    def put(*keys, value):
        def change(m):
            for key in keys[:-1]:
                m = m[key]
            m[keys[-1]] = value
        return change

    for version in (0, 1, 2, 99, "3", None):
        lie(f"version-{version}", put("version", value=version))
    lie("format-other", put("format", value="other"))
    for key in ("edits", "tensors", "meta", "model_spec", "input_shape", "num_classes"):
        lie(f"missing-{key}", lambda m, k=key: m.pop(k))
        lie(f"wrong-type-{key}", put(key, value="x"))
    for name in sorted(manifest["tensors"]):
        entry = manifest["tensors"][name]
        for enc in ("dense", "sparse_bitmask", "packed_bits", "sparse_packed_bits", "alias",
                    "palette-from-the-future", None):
            if enc != entry["encoding"]:
                lie(f"encoding-{enc}/{name}", put("tensors", name, "encoding", value=enc))
        for dtype in ("int8", "float64", "bool", "evil", "Tensor", "nn", None, 5):
            if dtype != entry["dtype"]:
                lie(f"dtype-{dtype}/{name}", put("tensors", name, "dtype", value=dtype))
        for label, shape in {"one": [1], "huge": [10**12], "negative": [-1], "text": "abc",
                             "null": None, "float": [1.5], "int64-max": [2**63],
                             "extra-dim": [*entry["shape"], 1]}.items():
            lie(f"shape-{label}/{name}", put("tensors", name, "shape", value=shape))
        if "nnz" in entry:
            lie(f"nnz-off-by-one/{name}", put("tensors", name, "nnz", value=entry["nnz"] + 1))
        if "bits" in entry:
            for bits in (0, 1, 3, 9, 64, 65, -1, "2", None):
                if bits != entry["bits"]:
                    lie(f"bits-{bits}/{name}", put("tensors", name, "bits", value=bits))
            for offset in (2**70, -(2**70), "x", None, 1.5):
                lie(f"offset-{offset}/{name}", put("tensors", name, "offset", value=offset))
        if entry["encoding"] == "alias":
            for target in ("missing", name, None, 3):
                lie(f"alias-of-{target}/{name}", put("tensors", name, "of", value=target))
    blob = manifest["blob"]
    lie("blob-entry-removed", put("blob", value=blob[1:]))
    lie("blob-entry-added", put("blob", value=[*blob, ["extra", "float32", [4]]]))
    lie("blob-size-changed", put("blob", value=[[blob[0][0], blob[0][1], [blob[0][2][0] + 1]],
                                                *blob[1:]]))
    lie("blob-dtype-changed", put("blob", value=[[blob[0][0], "float64", blob[0][2]],
                                                 *blob[1:]]))
    lie("blob-duplicate-key", put("blob", value=[blob[0], *blob]))
    lie("blob-not-a-list", put("blob", value={"a": 1}))
    lie("blob-entries-not-lists", put("blob", value=["x", 1]))
    lie("blob-huge-shape", put("blob", value=[[blob[0][0], "uint8", [2**62]], *blob[1:]]))
    edits = manifest["edits"]
    layer = next(i for i, e in enumerate(edits) if e.get("layer") == "Linear")
    tensor = next(i for i, e in enumerate(edits) if e.get("op") == "tensor")

    def edit(label: str, index: int, **values) -> None:
        def change(m):
            m["edits"][index].update(values)
        lie(f"edit-{label}", change)

    edit("linear-memory-bomb", layer, attrs={"in_features": 10**6, "out_features": 10**6,
                                             "bias": True})
    edit("linear-negative", layer, attrs={"in_features": -5, "out_features": 3, "bias": True})
    edit("linear-string-width", layer, attrs={"in_features": "64", "out_features": 32})
    edit("linear-unknown-arg", layer, attrs={"in_features": 64, "out_features": 32, "evil": 1})
    edit("unknown-layer", layer, layer="os.system")
    edit("dunder-layer", layer, layer="__class__")
    edit("tensor-memory-bomb", tensor, shape=[10**5, 10**5])
    edit("tensor-overflow-shape", tensor, shape=[2**40, 2**40])
    edit("tensor-bad-kind", tensor, kind="module")
    edit("tensor-dotted-name", tensor, name="a.b")
    edit("unknown-op", 0, op="exec")
    edit("path-traversal", layer, path="../../x")
    edit("path-missing-parent", layer, path="9.9.9")
    edit("path-not-a-string", layer, path=5)
    lie("edits-not-a-list", put("edits", value={"op": "module"}))
    lie("edits-items-not-dicts", put("edits", value=[1, "x", None]))
    lie("edits-empty", put("edits", value=[]))
    lie("edits-100k-removes", put("edits", value=[*edits, *[{"op": "remove", "path": "0"}]
                                                  * 100_000]))
    lie("edits-share-missing", put("edits", value=[*edits, {"op": "share", "path": "0",
                                                            "of": "nope"}]))
    lie("edits-order-bad", put("edits", value=[*edits, {"op": "order", "path": "",
                                                        "order": ["9", "x"]}]))
    lie("edits-value-object", put("edits", value=[*edits, {"op": "value", "path": "0",
                                                           "name": "forward", "value": 1}]))
    for spec in ({"zoo": "nope"}, {"python": "/nonexistent/evil.py:build"},
                 {"python": "/etc/passwd:root"}, {"zoo": "lenet5", "kwargs": {"evil": 1}},
                 {"zoo": "lenet5"}, {"zoo": "lenet5", "weights": "/etc/passwd"}):
        lie(f"model-spec-{json.dumps(spec)}", put("model_spec", value=spec))
    lie("zoo-with-huge-num-classes", lambda m: m.update(
        model_spec={"zoo": "lenet300"}, input_shape=[1, 28, 28], num_classes=10**9))
    lie("zoo-with-huge-input", lambda m: m.update(
        model_spec={"zoo": "lenet300"}, input_shape=[1, 100_000, 100_000], num_classes=10))
    lie("task-garbage", put("task", value={"kind": "evil", "python": "/x.py:y"}))
    lie("meta-huge-string", put("meta", value={"x": "a" * 10_000_000}))
    cases["manifest-not-json"] = _with_manifest(base, b"{not json")
    cases["manifest-json-list"] = _with_manifest(base, b"[1, 2]")
    cases["manifest-zlib-bomb"] = _with_manifest(base, b" " * 200_000_000)
    for name, envelope in {
        "envelope-not-json": "{", "envelope-list": "[]", "envelope-no-zlib": json.dumps(
            {"format": "lighten-artifact", "version": 3}),
        "envelope-bad-base64": json.dumps({"format": "lighten-artifact", "version": 3,
                                           "zlib": "!!!"}),
        "envelope-truncated-zlib": json.dumps(
            {"format": "lighten-artifact", "version": 3,
             "zlib": base64.b64encode(zlib.compress(b'{"a": 1}')[:-3]).decode()}),
        "envelope-zlib-number": json.dumps({"format": "lighten-artifact", "version": 3,
                                            "zlib": 5}),
        "envelope-future": json.dumps({"format": "lighten-artifact", "version": 4}),
    }.items():
        cases[name] = _with_envelope(base, envelope)
    return cases


def _nonfinite_cases(folder: Path) -> dict[str, bytes]:
    """Good files whose weights hold NaN or Inf: reported, never loaded silently."""
    cases = {}
    for label, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", -float("inf"))):
        for where in ("2.weight", "3.bias", "0.weight"):
            model = tiny_model()
            with torch.no_grad():
                model.state_dict()[where].view(-1)[1] = value
            path = folder / "tmp.safetensors"
            save_artifact(model, path, model_spec=None)
            cases[f"weights-{label}/{where}/artifact"] = path.read_bytes()
            state = {k: v.clone() for k, v in model.state_dict().items()}
            cases[f"weights-{label}/{where}/plain"] = save(state)
    (folder / "tmp.safetensors").unlink()
    return cases


def build_corpus(folder: str | Path) -> list[tuple[str, Path]]:
    folder = Path(folder)
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    good_artifact = folder / "good-artifact.safetensors"
    save_artifact(tiny_model(), good_artifact, model_spec=None)
    artifact = good_artifact.read_bytes()
    plain = save({k: v.clone() for k, v in tiny_model().state_dict().items()})
    (folder / "good-plain.safetensors").write_bytes(plain)
    manifest = _read_manifest(good_artifact)
    rng = random.Random(16)
    cases: dict[str, bytes] = {}
    for label, base in (("artifact", artifact), ("plain", plain)):
        for name, data in _safetensors_cases(base, rng).items():
            cases[f"{label}/{name}"] = data
    for name, data in _manifest_cases(artifact, manifest).items():
        cases[f"artifact/{name}"] = data
    cases.update(_nonfinite_cases(folder))
    found = []
    for i, (name, data) in enumerate(cases.items()):
        path = files / f"{i:04d}.safetensors"
        path.write_bytes(data)
        found.append((name, path))
    return found
