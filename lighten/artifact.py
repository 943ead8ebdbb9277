"""Compressed models on disk: one ``.safetensors`` file whose size is the real, reported size.

The JSON manifest lives in the safetensors metadata under ``"lighten"``, zlib-compressed (level 9)
and base64-encoded inside a small envelope ``{"format", "version", "zlib"}`` -- an envelope, so an
older lighten still reads the version and asks for an upgrade. Version 1 files (plain JSON
manifest, every tensor its own safetensors entry) load unchanged. The manifest says how to rebuild
the model without executing or unpickling anything from the file:

* ``model_spec``: how to build the *source* model (``lighten.models.build_model``: a zoo name
  or a ``python:`` factory), or null when the edit log builds the whole model;
  ``input_shape``/``num_classes`` are what the source is built with (null where they do not
  apply) and ``task`` (when given) what the model's inputs and outputs are;
* ``edits`` (version 3): the ordered structural edits that turn the source into the saved model
  (:mod:`lighten.edits`: put a standard layer or registered module, remove, share, reorder, set
  a scalar, resize/add/drop an own tensor), derived by diffing the model against a fresh source
  at save time and replayed on load. Version 1/2 manifests (``modules``, ``shapes``,
  ``values``, ``resized``) are turned into the same edits (:func:`lighten.edits.legacy_edits`);
* ``tensors``: per state_dict entry ``{encoding, dtype, shape}``, left out for ``dense`` tensors
  (their stored dtype and shape say it all; :func:`load_artifact` fills them back in). ``dense``
  stores the tensor as is (int8 stays int8); ``sparse_bitmask`` stores a packed bit mask
  (``numpy.packbits``) plus the non-zero values, chosen whenever that is smaller; ``alias``
  marks tied tensors, stored once. Integer tensors whose values span fewer bits than their
  dtype (int4 weights in int8 containers) are stored ``packed_bits``: ``value - offset`` in
  ``bits`` bits per element (:func:`pack_bits`, little-endian, so 4-bit values go two per byte,
  first in the low nibble);
  ``sparse_packed_bits`` is the bit mask plus the non-zero values packed that way. The saver
  picks the smallest encoding per tensor; every one round-trips bit for bit.
* ``blob`` (version 2): stored parts of at most ``TINY_BYTES`` (biases, scales, zero points, BN
  statistics) are joined into one uint8 tensor ``#blob``; ``blob`` lists ``[key, dtype, shape]``
  in storage order (:func:`lighten.codecs.join_tensors`), so the safetensors header holds a handful
  of entries instead of hundreds, while large tensors stay plain entries any safetensors tool reads.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lighten.codecs import (
    RAW_DTYPES,
    fits_int64,
    index_bits,
    join_tensors,
    nonzero_mask,
    pack_bitmask,
    pack_bits,
    packed_width,
    palette_of,
    palette_values,
    split_tensors,
    unpack_bitmask,
    unpack_bits,
)
from lighten.edits import derive_edits, legacy_edits, replay_edits
from lighten.errors import CheckpointError, LightenError
from lighten.modules import get_submodule
from lighten.provenance import atomic_write_bytes
from lighten.trust import check_code_allowed, trusting

FORMAT = "lighten-artifact"
VERSION = 3
METADATA_KEY = "lighten"
BLOB_KEY = "#blob"
# Stored parts up to this size go into the blob: a safetensors header entry costs ~80 bytes plus
# the name, a blob index entry ~15 compressed bytes. 1 KiB = 256 float32 values.
TINY_BYTES = 1024
# Decompressed manifests above this are refused (a zlib bomb in a downloaded file; a model of
# thousands of layers has a manifest of a few hundred KB).
_MAX_MANIFEST_BYTES = 16 << 20
# A manifest may rebuild at most this many bytes of tensors per byte of file (+ _BUILD_SLACK):
# 64 = a float64 tensor stored as a 1-bit mask, the most any encoding expands. More is a lie
# (a memory bomb), refused before anything is allocated.
_BUILD_RATIO, _BUILD_SLACK = 64, 256 << 20

# Attribute set on a model by encode.entropy (lighten.encode.streams.ENTROPY_FLAG, kept equal):
# its artifact's parts are entropy-coded; a loaded coded artifact gets it back.
ENTROPY_FLAG = "_lighten_entropy_coded"

_PICKLE_HINT = "lighten never unpickles; load it with lighten.models.load_weights and save_artifact"
_PLAIN_HINT = ("plain weights need their architecture: `MODEL --weights FILE` on the command line "
               "(MODEL a zoo name or file.py:factory), lighten.models.load_weights in Python")


# ----------------------------------------------------------------------------- save


def save_artifact(model: nn.Module, path: str | os.PathLike, *, model_spec: dict | None,
                  input_shape=None, num_classes: int | None = None, task=None,
                  meta: dict | None = None) -> int:
    """Write ``model`` as one artifact file atomically; returns the bytes on disk.

    ``model_spec`` names the source model the edit log starts from (``{"zoo": ...}``,
    ``{"python": ...}``; None when the model is built from describable modules alone).
    ``input_shape``/``num_classes`` are what the source factory is built with; ``task`` (a
    :class:`lighten.task.Task` or its ``describe()`` dict) is recorded, so the source is built
    for the same task on load (a language model's vocabulary) and a user knows its inputs.
    """
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"save_artifact needs an nn.Module, got {type(model).__name__}")
    if model_spec is not None and not isinstance(model_spec, dict):
        raise CheckpointError(f"model_spec must be a dict like {{'zoo': 'lenet5'}} or None, "
                              f"got {type(model_spec).__name__}")
    try:
        shape = None if input_shape is None else [int(d) for d in input_shape]
        num_classes = None if num_classes is None else int(num_classes)
    except (TypeError, ValueError):
        raise CheckpointError(f"save_artifact needs input_shape like [1, 28, 28] and an int "
                              f"num_classes, got {input_shape!r} and {num_classes!r}") from None
    if task is not None and not isinstance(task, dict):
        task = task.describe()
    if shape is None:  # the spec's or the task's: a load builds the source with it
        given = (model_spec or {}).get("input_shape") or (task or {}).get("input_shape")
        try:
            shape = None if given is None else [int(d) for d in given]
        except (TypeError, ValueError):
            raise CheckpointError(f"save_artifact needs input_shape like [1, 28, 28]; the "
                                  f"model_spec / task give {given!r}") from None
    model_spec = _checked_spec(model_spec, shape)
    source, _ = _source_model(model_spec, shape, num_classes, task)
    if model_spec is not None:
        # a wrapper built around the source model (early exit, gating) by lighten.compress, which
        # never sees a spec, is rebuilt from the source this artifact names
        for module in model.modules():
            if hasattr(module, "backbone_spec") and module.backbone_spec is None:
                module.backbone_spec = dict(model_spec)
    with torch.random.fork_rng(devices=[]):  # rebuilding layers must not shift the caller's RNG
        if source is None and model_spec is not None:  # e.g. saved where the model file is not:
            edits = derive_edits(model, copy.deepcopy(model), source_unknown=True)
        else:
            edits = derive_edits(model, source)
    parts, entries = _encode_state(model.state_dict())
    header = {"model_spec": model_spec, "input_shape": shape, "num_classes": num_classes,
              "edits": edits, "meta": meta, "task": task}
    coding = bool(getattr(model, ENTROPY_FLAG, False))  # encode.entropy: coded parts (ANS)
    if coding:
        header["entropy_coding"] = True  # asked for, coded or not: a reload keeps asking
    data = _artifact_bytes(path, parts, entries, None, header)
    if coding:
        from lighten.encode.streams import CODER, code_parts

        coded = _artifact_bytes(path, *code_parts(parts, entries)[:2], CODER, header)
        # a model of short streams can come out larger, counts tables and entries included:
        # then the file stays as it was (the loader reads either)
        data = coded if len(coded) < len(data) else data
    return atomic_write_bytes(path, data)


def _artifact_bytes(path, parts: dict, entries: dict, coder, header: dict) -> bytes:
    """The artifact file's bytes: ``parts`` (tiny ones joined into one blob) and the manifest."""
    from safetensors.torch import save

    from lighten.verify import stream_digests

    tensors, blob_index = _join_tiny(parts)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "model_spec": header["model_spec"], "input_shape": header["input_shape"],
        "num_classes": header["num_classes"], "edits": header["edits"],
        # dense tensors need no entry (their stored dtype and shape say it all) unless they are
        # float32 values stored as float16
        "tensors": {k: e for k, e in entries.items()
                    if e["encoding"] != "dense" or "#" in k or "stored_dtype" in e},
        "meta": dict(header["meta"] or {}),  # a copy: the save time is taken out below
    }
    if header["task"]:
        manifest["task"] = header["task"]
    if header.get("entropy_coding"):
        manifest["entropy_coding"] = True
    if blob_index:
        manifest["blob"] = blob_index
    if coder:
        manifest["coder"] = coder
    manifest["sha256"] = stream_digests(tensors)  # `lighten verify` checks every stored byte
    saved_at = _pop_timestamp(manifest["meta"])
    try:
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save {path}: manifest is not JSON ({err}); model_spec, "
                              "meta and artifact_config() must hold plain JSON values") from None
    return save(tensors, metadata={"format": "pt", METADATA_KEY: _envelope(text, saved_at)})


def _envelope(text: str, saved_at: str | None = None) -> str:
    """The manifest as stored: compressed, base64 (metadata values must be strings). The save
    time stays outside the compressed part: inside, a different second changes the compressed
    length, so the same model saved twice (a resumed run) differed in its bytes on disk."""
    packed = base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")
    envelope = {"format": FORMAT, "version": VERSION, "zlib": packed}
    if saved_at is not None:
        envelope["saved_at"] = saved_at
    return json.dumps(envelope, separators=(",", ":"))


def _pop_timestamp(meta: dict) -> str | None:
    """``meta["provenance"]["timestamp_utc"]`` removed from a copy-on-write ``meta`` (the
    caller's dict is left as it was); None where there is none."""
    provenance = meta.get("provenance") if isinstance(meta, dict) else None
    if not isinstance(provenance, dict) or "timestamp_utc" not in provenance:
        return None
    stamp = provenance["timestamp_utc"]
    meta["provenance"] = {k: v for k, v in provenance.items() if k != "timestamp_utc"}
    return str(stamp)


def _join_tiny(parts: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list]]:
    """Parts of at most TINY_BYTES go into one blob tensor; returns (tensors to save, index)."""
    if BLOB_KEY in parts:
        raise CheckpointError(f"state_dict key {BLOB_KEY!r} clashes with the artifact's blob of "
                              "small tensors; rename that parameter or buffer")
    tiny = {k: t for k, t in parts.items()
            if t.nbytes <= TINY_BYTES and t.dtype in RAW_DTYPES}
    if not tiny:
        return parts, []
    blob, index = join_tensors(tiny)
    stored = {k: t for k, t in parts.items() if k not in tiny}
    stored[BLOB_KEY] = blob
    return stored, index


def _checked_spec(model_spec: dict | None, shape: list[int] | None) -> dict | None:
    """``model_spec`` as load_artifact will read it, refused now (not at load time) when it
    cannot be; a python: spec without input_shape takes the artifact's."""
    from pydantic import ValidationError

    from lighten.models import ModelSpec
    from lighten.recipe import describe_validation_error

    if not model_spec:  # None or {}: no source named; a load needs model= (a skeleton)
        return model_spec
    spec = dict(model_spec)
    if spec.get("python") is not None and spec.get("input_shape") is None and shape:
        spec["input_shape"] = list(shape)
    try:
        ModelSpec(**{k: v for k, v in spec.items() if k != "weights"})
    except ValidationError as err:
        raise CheckpointError(f"model_spec {model_spec}: "
                              f"{describe_validation_error(err, ModelSpec)}; a load could not "
                              "build the model from it") from None
    except TypeError as err:
        raise CheckpointError(f"model_spec {model_spec}: {err}") from None
    return spec


def _source_model(model_spec: dict | None, input_shape, num_classes, task: dict | None
                  ) -> tuple[nn.Module | None, str]:
    """The source model the edit log starts from, and why it is None when it cannot be built."""
    if model_spec is None:
        return None, "no model_spec"
    try:
        from lighten.models import ModelSpec, build_model

        spec = ModelSpec(**{k: v for k, v in model_spec.items() if k != "weights"})
        with torch.random.fork_rng(devices=[]):  # saving must not shift the caller's RNG
            return build_model(spec, input_shape=tuple(input_shape or ()),
                               num_classes=num_classes, task=_task(task)), ""
    except (ImportError, LightenError, ValueError, TypeError) as err:
        return None, str(err).splitlines()[0] if str(err) else type(err).__name__


def _encode_state(state: dict) -> tuple[dict, dict]:
    """state_dict -> (tensors to store, manifest entries); tied tensors are stored once."""
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    first_name: dict[tuple, str] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot save state_dict entry {name!r} of type "
                                  f"{type(value).__name__}; artifacts hold tensors only (put "
                                  "other values in the module's artifact_config())")
        t = value.detach()
        if t.is_quantized or t.device.type == "meta":
            raise CheckpointError(f"cannot save {name!r} ({t.dtype} on {t.device}); store "
                                  "plain int8/float tensors plus scale tensors instead")
        entry = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                    tuple(t.stride()), t.dtype, t.device)
        if t.numel() > 0 and identity in first_name:
            entries[name] = {"encoding": "alias", "of": first_name[identity], **entry}
            continue
        first_name[identity] = name
        t = t.cpu().contiguous()
        if t.dtype == torch.float32 and t.numel() and torch.equal(t.half().float(), t):
            entry["stored_dtype"] = "float16"  # every value is a float16: half the bytes, exact
            t = t.half()
        for key, part in _encode_tensor(name, t, entry).items():
            if key in stored:
                raise CheckpointError(f"state_dict key {key!r} clashes with an encoded tensor "
                                      "name; rename that parameter or buffer")
            stored[key] = part
        entries[name] = entry
    return stored, entries


def _encode_tensor(name: str, t: torch.Tensor, entry: dict) -> dict[str, torch.Tensor]:
    """Pick the smallest of dense, sparse_bitmask, (integers) packed_bits/sparse_packed_bits and
    (few distinct values) palette/sparse_palette.

    Each candidate's size counts the index entries its parts need (:func:`_part_cost`) and, for
    encodings other than dense, the manifest entry that names them.
    """
    n, itemsize = t.numel(), t.element_size()
    candidates: dict[str, int] = {"dense": _part_cost(name, n * itemsize)}
    nonzero = nnz = None
    palettes: dict = {}
    if n > 0:
        nonzero = nonzero_mask(t)
        nnz = int(nonzero.sum())
        mask = _part_cost(name, math.ceil(n / 8)) + _ENTRY_COST
        candidates["sparse_bitmask"] = mask + _part_cost(name, nnz * itemsize)
        if t.dtype in _PACKABLE:
            flat = t.reshape(-1)
            bits, offset = packed_width(flat)
            if bits < itemsize * 8:
                candidates["packed_bits"] = _part_cost(name, math.ceil(n * bits / 8)) + (
                    _ENTRY_COST)
            if 0 < nnz < n:
                sbits, soffset = packed_width(flat[nonzero])
                if sbits < itemsize * 8:
                    candidates["sparse_packed_bits"] = mask + _part_cost(
                        name, math.ceil(nnz * sbits / 8))
        palettes = _palettes(t, nonzero, nnz)
        for kind, (table, index) in palettes.items():
            count = index.numel()
            candidates[kind] = (_part_cost(name, table.nbytes) + _ENTRY_COST + _part_cost(
                name, math.ceil(count * index_bits(table.numel()) / 8))
                + (mask if kind == "sparse_palette" else 0))
    encoding = min(candidates, key=lambda k: (candidates[k], k != "dense"))
    if "packed" in encoding or "palette" in encoding:  # must pay for itself (_PACK_MIN_GAIN)
        plain = min(candidates[k] for k in ("dense", "sparse_bitmask") if k in candidates)
        if candidates[encoding] > (1 - _PACK_MIN_GAIN) * plain:
            encoding = "dense" if candidates["dense"] <= plain else "sparse_bitmask"
    entry["encoding"] = encoding
    if encoding == "dense":
        return {name: t.clone()}  # own storage: safetensors refuses tensors that share memory
    if encoding == "sparse_bitmask":
        entry["nnz"] = nnz
        mask, values = pack_bitmask(t, nonzero=nonzero)
        return {f"{name}#mask": mask, f"{name}#values": values}
    if encoding == "packed_bits":
        entry.update(bits=bits, offset=offset)
        return {f"{name}#packed": pack_bits(t, bits=bits, offset=offset)}
    if encoding in palettes:  # the table of distinct values + each value's packed index
        table, index = palettes[encoding]
        entry["bits"] = ibits = index_bits(table.numel())
        parts = {f"{name}#palette": table.clone(),
                 f"{name}#index": pack_bits(index, bits=ibits, offset=0)}
        if encoding == "sparse_palette":
            entry["nnz"] = nnz
            parts[f"{name}#mask"] = pack_bitmask(t, nonzero=nonzero)[0]
        return parts
    entry.update(nnz=nnz, bits=sbits, offset=soffset)
    mask, values = pack_bitmask(t, nonzero=nonzero)
    return {f"{name}#mask": mask, f"{name}#packed": pack_bits(values, bits=sbits, offset=soffset)}


def _part_cost(name: str, nbytes: int) -> int:
    """Bytes one stored part costs: its data plus a blob index or safetensors header entry."""
    return nbytes + (_BLOB_ENTRY_COST if nbytes <= TINY_BYTES else len(name) + 80)


def _palettes(t: torch.Tensor, nonzero: torch.Tensor | None, nnz: int | None) -> dict:
    """``palette`` (every value) and ``sparse_palette`` (the non-zero ones, zeros in the mask)
    candidates as (table, index), for tensors with few distinct values: clustered weights
    (``share.kmeans``), codebooks, one-hot or constant buffers. Trained float weights have as
    many distinct values as entries, so a sample in which most values differ skips the sort."""
    if t.numel() < _PALETTE_MIN or t.dtype not in RAW_DTYPES or t.dtype is torch.bool:
        return {}
    flat = t.reshape(-1)
    sample = flat[:_PALETTE_SAMPLE]
    if palette_of(sample, max_size=sample.numel() // 2) is None:
        return {}
    out = {}
    for kind, values in (("palette", flat),
                         ("sparse_palette", flat[nonzero] if 0 < nnz < t.numel() else None)):
        found = None if values is None else palette_of(values, max_size=_PALETTE_MAX)
        if found is not None:
            out[kind] = found
    return out


# Palettes: tensors of at least _PALETTE_MIN values, of at most _PALETTE_MAX distinct ones
# (16-bit indices), tried only when at most half of the first _PALETTE_SAMPLE values differ.
_PALETTE_MIN = 16
_PALETTE_MAX = 1 << 16
_PALETTE_SAMPLE = 4096
# Rough compressed sizes of a blob index entry and of a manifest `tensors` entry.
_BLOB_ENTRY_COST = 12
_ENTRY_COST = 16
# Packing is chosen only when it saves at least this fraction over dense/sparse_bitmask: a plain
# int8 tensor stays readable by any safetensors tool and loads without unpacking, so 7-bit values
# (PTQ's reduce_range weights, 12.5% smaller packed) stay dense while 2..6-bit ones are packed.
_PACK_MIN_GAIN = 0.2
# Integer dtypes the packed encodings accept (bool is already one byte of one bit; floats lose).
_PACKABLE = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------- load


def load_artifact(path: str | os.PathLike, *, model: nn.Module | None = None,
                  bits: int | None = None, trust: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the saved model (in eval mode) and return it with the manifest.

    ``bits`` picks the precision of a ``dynamic.any_precision`` model (one of its trained
    widths); other models refuse it.

    Without ``model`` the architecture is built from the manifest's ``model_spec``. A
    ``python:`` spec names a file and a function to run with keyword arguments, all taken from
    the file being loaded -- code execution if the file is hostile -- so it is run only with
    ``trust=True`` (``--trust``: you made this file, or trust who did) or when this process
    has imported that file already (not a library file: a model written and reloaded in one
    session); otherwise pass ``model`` (used as the skeleton and modified in place). Zoo and
    ``hf:`` specs run no code from the file and need no trust.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if model is not None and not isinstance(model, nn.Module):
        raise CheckpointError(f"load_artifact(model=...) needs an nn.Module, "
                              f"got {type(model).__name__}")
    _check_build_size(path, manifest)
    # Building modules draws random init values that are overwritten; keep the caller's RNG.
    with torch.random.fork_rng(devices=[]), trusting(trust):  # wrappers' backbones too
        if model is None and manifest.get("model_spec") is not None:
            model = _build_from_spec(path, manifest, trust=trust)
        edits = manifest["edits"] if manifest["version"] >= 3 else legacy_edits(manifest)
        try:
            model = replay_edits(model, edits)
        except CheckpointError as err:  # UntrustedCodeError stays one
            raise type(err)(f"{path}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError,
                OverflowError) as err:
            raise CheckpointError(f"{path}: its edit log does not replay ({type(err).__name__}: "
                                  f"{err}); the file is corrupt, re-save it") from None
    entries, stored = _read_stored(path, manifest)
    coder = manifest.get("coder")
    try:  # every value below comes from the file: a type the manifest lies about is damage
        state = _decode_state(path, *_uncode(path, coder, entries, stored) if coder else (
            entries, stored))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError,
            OverflowError) as err:
        raise CheckpointError(f"{path}: its tensors do not decode as its manifest says "
                              f"({type(err).__name__}: {str(err)[:120]}); the file is corrupt, "
                              "re-save it") from None
    if coder or manifest.get("entropy_coding"):  # saved again, it stays entropy-coded
        setattr(model, ENTROPY_FLAG, True)
    _check_fits(path, model, state)
    _match_dtypes(model, state)
    check_finite(model, state, path)
    model.load_state_dict(state, strict=True)
    _retie(model, entries)
    manifest = {k: v for k, v in manifest.items() if k != "blob"}
    if bits is not None:
        from lighten.dynamic.any_precision import select_precision

        model = select_precision(model, bits)
    return model.eval(), {**manifest, "tensors": entries}


def _read_stored(path: Path, manifest: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(every tensor's manifest entry, stored parts by key) with the blob split back apart."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    if "blob" in manifest:
        blob = _stored(path, stored, BLOB_KEY)
        del stored[BLOB_KEY]
        try:
            parts = split_tensors(blob, manifest["blob"])
        except ValueError as err:
            raise CheckpointError(f"{path}: its blob of small tensors is corrupt ({err}); "
                                  "re-save it") from None
        clash = next((k for k in parts if k in stored), None)
        if clash is not None:
            raise CheckpointError(f"{path} stores {clash!r} twice (in the blob and on its own); "
                                  "the file is corrupt, re-save it")
        stored.update(parts)
    entries = dict(manifest["tensors"])
    for key, t in stored.items():  # dense tensors have no entry since version 2
        if "#" not in key and key not in entries:
            entries[key] = {"encoding": "dense", "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape)}
    return entries, stored


def _read_manifest(path: Path) -> dict:
    """Validate the file and return its manifest; every failure is one CheckpointError line."""
    if not path.is_file():
        raise CheckpointError(f"artifact {path} does not exist; check the path")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError for any bad header
        with open(path, "rb") as f:
            head = f.read(3)
        # torch.save writes a zip (PK..) or, in the legacy format, a pickle (0x80, protocol, an
        # opcode). A safetensors header length can start 0x80 0x02 too, but then a zero byte.
        pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") \
            and head[2:3] not in (b"", b"\x00")
        if head[:2] == b"PK" or pickled or path.suffix in (".pt", ".pth", ".pkl", ".ckpt"):
            raise CheckpointError(f"{path} is a pickle/torch.save file; {_PICKLE_HINT}") from None
        if path.suffix == ".onnx":
            raise CheckpointError(f"{path} is an ONNX model, not a lighten artifact: give "
                                  "the .safetensors stage file `lighten run` (or save_artifact) "
                                  "wrote, from which the ONNX file was exported") from None
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({detail}); re-save it") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not a lighten artifact (no manifest); {_PLAIN_HINT}")
    try:
        manifest = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has a corrupt manifest ({err}); re-save it") from None
    _check_header(path, manifest)
    if "zlib" in manifest:
        saved_at = manifest.get("saved_at")
        manifest = _inflate(path, manifest["zlib"])
        _check_header(path, manifest)
        provenance = manifest.get("meta", {}).get("provenance") if isinstance(
            manifest.get("meta"), dict) else None
        if isinstance(saved_at, str) and isinstance(provenance, dict):
            provenance["timestamp_utc"] = saved_at
    if manifest["version"] >= 3:
        required = (("model_spec", (dict, type(None))), ("input_shape", (list, type(None))),
                    ("num_classes", (int, type(None))), ("edits", list), ("tensors", dict),
                    ("meta", dict))
    else:
        required = (("model_spec", dict), ("input_shape", list), ("num_classes", int),
                    ("modules", list), ("shapes", list), ("tensors", dict), ("meta", dict))
    for key, kind in required:
        if not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"{path} manifest lacks a valid {key!r}; re-save it")
    for key in ("values", "resized"):
        if not isinstance(manifest.get(key, []), list) or not all(
                isinstance(e, dict) for e in manifest.get(key, [])):
            raise CheckpointError(f"{path} manifest has an invalid {key!r}; re-save it")
    if not isinstance(manifest.get("blob", []), list):
        raise CheckpointError(f"{path} manifest lacks a valid 'blob'; re-save it")
    return manifest


def _check_header(path: Path, manifest: Any) -> None:
    """Format and version of the envelope (version 2) or of the manifest itself."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lighten artifact (unknown manifest format); "
                              f"{_PLAIN_HINT}")
    version = manifest.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path} has no manifest version; re-save it")
    if version > VERSION:
        raise CheckpointError(f"{path} has manifest version {version}, newer than this lighten "
                              f"supports ({VERSION}); upgrade lighten")


def _inflate(path: Path, packed: Any) -> Any:
    """base64 + zlib -> JSON, bounded in size; any damage is one CheckpointError line."""
    try:
        if not isinstance(packed, str):
            raise ValueError(f"'zlib' holds {type(packed).__name__}, not text")
        raw = base64.b64decode(packed, validate=True)
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, _MAX_MANIFEST_BYTES)
        if inflater.unconsumed_tail:
            raise ValueError(f"it inflates past {_MAX_MANIFEST_BYTES} bytes")
        if not inflater.eof:
            raise ValueError("the zlib stream is truncated")
        return json.loads(text)
    except (ValueError, binascii.Error, zlib.error) as err:  # JSON and UTF-8 errors included
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} has a corrupt compressed manifest ({detail}); "
                              "re-save it") from None


def _build_from_spec(path: Path, manifest: dict, *, trust: bool = False) -> nn.Module:
    from pydantic import ValidationError

    from lighten.models import ModelSpec, build_model

    spec = {k: v for k, v in manifest["model_spec"].items() if k != "weights"}  # file has them
    try:
        model_spec = ModelSpec(**spec)
    except ValidationError as err:
        from lighten.recipe import describe_validation_error

        raise CheckpointError(f"{path} has an invalid model_spec {spec} "
                              f"({describe_validation_error(err, ModelSpec)}); pass "
                              "load_artifact(..., model=...)") from None
    except TypeError as err:
        raise CheckpointError(f"{path} has an invalid model_spec {spec} ({err}); pass "
                              "load_artifact(..., model=...)") from None
    if model_spec.python is not None:
        check_code_allowed(model_spec.python, str(path), trust=trust)
    try:
        task = _task(manifest.get("task"))
    except LightenError as err:
        raise CheckpointError(f"{path} records a task that cannot be rebuilt here ({err}); pass "
                              "load_artifact(..., model=...)") from None
    try:
        return build_model(model_spec, input_shape=tuple(manifest["input_shape"] or ()),
                           num_classes=manifest["num_classes"], task=task)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # e.g. no num_classes
        raise CheckpointError(f"{path}: its model_spec {spec} does not build with input_shape "
                              f"{manifest['input_shape']} and num_classes "
                              f"{manifest['num_classes']} ({type(err).__name__}: "
                              f"{str(err)[:120]}); pass load_artifact(..., model=...)") from None


def _task(description: dict | None):
    """The recorded task, rebuilt (None: classification of input_shape into num_classes)."""
    if not isinstance(description, dict):
        return None
    from lighten.task import task_from_dict

    return task_from_dict(description)


def _decode_state(path: Path, entries: dict, stored: dict) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    aliases = {}
    for name, entry in entries.items():
        dtype, shape = _dtype(path, entry.get("dtype")), _shape(path, name, entry.get("shape"))
        encoding = entry.get("encoding")
        widened = dtype
        if "stored_dtype" in entry:  # float32 values that are all float16s, stored as such
            if entry["stored_dtype"] != "float16" or dtype != torch.float32:
                raise CheckpointError(f"{path}: tensor {name!r} claims {dtype} stored as "
                                      f"{entry['stored_dtype']!r}; the file is corrupt, re-save it")
            dtype = torch.float16
        if encoding == "alias":
            aliases[name] = entry
            continue
        if encoding == "dense":
            t = _stored(path, stored, name)
        elif encoding == "sparse_bitmask":
            t = _decode_sparse(path, name, _stored(path, stored, f"{name}#mask"),
                               _stored(path, stored, f"{name}#values"), dtype, shape)
        elif encoding in ("packed_bits", "sparse_packed_bits"):
            t = _decode_packed(path, name, entry, stored, dtype, shape)
        elif encoding in ("palette", "sparse_palette"):
            t = _decode_palette(path, name, entry, stored, dtype, shape)
        else:
            raise CheckpointError(f"{path}: tensor {name!r} uses unknown encoding {encoding!r}; "
                                  "it needs a newer lighten")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)} but the "
                                  f"manifest says {dtype} {shape}; the file is corrupt, re-save it")
        state[name] = t.to(widened)
    for name, entry in aliases.items():
        if entry.get("of") not in state:
            raise CheckpointError(f"{path}: tensor {name!r} aliases missing {entry.get('of')!r}; "
                                  "the file is corrupt, re-save it")
        state[name] = state[entry["of"]]
    return state


def _decode_sparse(path: Path, name: str, mask: torch.Tensor, values: torch.Tensor,
                   dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    if mask.dtype != torch.uint8 or mask.numel() != math.ceil(n / 8) or values.dim() != 1:
        raise CheckpointError(f"{path}: sparse tensor {name!r} has a mask/values layout that "
                              f"does not match shape {shape}; the file is corrupt, re-save it")
    bits = int(np.unpackbits(mask.numpy(), count=n).sum())
    if bits != values.numel() or values.dtype != dtype:
        raise CheckpointError(f"{path}: sparse tensor {name!r} has {values.numel()} values for "
                              f"{bits} set mask bits; the file is corrupt, re-save it")
    return unpack_bitmask(mask, values, dtype=dtype, shape=shape)


def _decode_packed(path: Path, name: str, entry: dict, stored: dict, dtype: torch.dtype,
                   shape: tuple[int, ...]) -> torch.Tensor:
    """``packed_bits`` or ``sparse_packed_bits`` (mask + packed non-zero values)."""
    bits, offset = entry.get("bits"), entry.get("offset")
    if (not isinstance(bits, int) or not isinstance(offset, int) or not 0 <= bits <= 64
            or not -(2**63) <= offset < 2**63 or dtype not in _PACKABLE):
        raise CheckpointError(f"{path}: packed tensor {name!r} has bits={bits!r}, "
                              f"offset={offset!r} for {dtype}; the file is corrupt, re-save it")
    n = math.prod(shape)
    nonzero = None
    if entry["encoding"] == "sparse_packed_bits":
        mask = _stored(path, stored, f"{name}#mask")
        if mask.dtype != torch.uint8 or mask.numel() != math.ceil(n / 8):
            raise CheckpointError(f"{path}: sparse tensor {name!r} has a mask that does not "
                                  f"match shape {shape}; the file is corrupt, re-save it")
        nonzero = torch.from_numpy(np.unpackbits(mask.numpy(), count=n).astype(bool))
        count = int(nonzero.sum())
    else:
        count = n
    packed = _stored(path, stored, f"{name}#packed")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(
            count * bits / 8):
        raise CheckpointError(f"{path}: packed tensor {name!r} holds {packed.numel()} bytes, not "
                              f"{math.ceil(count * bits / 8)} for {count} values of {bits} bits; "
                              "the file is corrupt, re-save it")
    values = unpack_bits(packed, bits=bits, offset=offset, count=count, dtype=dtype)
    if nonzero is None:
        return values.reshape(shape)
    out = torch.zeros(n, dtype=dtype)
    out[nonzero] = values
    return out.reshape(shape)


def _uncode(path: Path, coder, entries: dict, stored: dict) -> tuple[dict, dict]:
    """Entropy-coded parts (``encode.entropy``) decoded back to the parts they were."""
    from lighten.encode.streams import uncode_parts

    try:
        return uncode_parts(coder, entries, stored)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its entropy-coded tensors do not decode ({err}); the "
                              "file is corrupt, re-save it") from None


def _decode_palette(path: Path, name: str, entry: dict, stored: dict, dtype: torch.dtype,
                    shape: tuple[int, ...]) -> torch.Tensor:
    """``palette`` (table + packed index of every value) or ``sparse_palette`` (+ bit mask)."""
    table, packed = _stored(path, stored, f"{name}#palette"), _stored(path, stored, f"{name}#index")
    n, bits = math.prod(shape), entry.get("bits")
    count = entry.get("nnz") if entry["encoding"] == "sparse_palette" else n
    if (table.dtype != dtype or table.dim() != 1 or not isinstance(bits, int)
            or not isinstance(count, int) or bits != index_bits(table.numel())
            or packed.dtype != torch.uint8 or packed.numel() != math.ceil(count * bits / 8)):
        raise CheckpointError(f"{path}: palette tensor {name!r} has a table/index layout that "
                              f"does not match {dtype} {shape}; the file is corrupt, re-save it")
    index = unpack_bits(packed, bits=bits, offset=0, count=count, dtype=torch.int64)
    if count and int(index.max()) >= table.numel():
        raise CheckpointError(f"{path}: palette tensor {name!r} indexes past its table of "
                              f"{table.numel()}; the file is corrupt, re-save it")
    values = palette_values(table, index)
    if entry["encoding"] == "palette":
        return values.reshape(shape)
    return _decode_sparse(path, name, _stored(path, stored, f"{name}#mask"), values, dtype, shape)


def _stored(path: Path, stored: dict, key: str) -> torch.Tensor:
    if key not in stored:
        raise CheckpointError(f"{path} lacks stored tensor {key!r} named in its manifest; "
                              "the file is corrupt, re-save it")
    return stored[key]


def _shape(path: Path, name: str, shape: Any) -> tuple[int, ...]:
    if (not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**48 for d in shape)
            or not fits_int64(shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {str(shape)[:80]} in the "
                              "manifest, not a list of sizes; the file is corrupt, re-save it")
    return tuple(shape)


def _check_build_size(path: Path, manifest: dict) -> None:
    """Refuse, before anything is allocated, a manifest that would build far more tensor bytes
    than the file could fill: each layer and tensor its source and edit log make is built on the
    meta device (no memory) and counted. What fails to build there is left to the real build."""
    from lighten.edits import build_layer
    from lighten.modules import get_module_type

    limit = _BUILD_RATIO * path.stat().st_size + _BUILD_SLACK
    spec = manifest.get("model_spec") if isinstance(manifest.get("model_spec"), dict) else {}
    makers = []
    if isinstance(spec.get("zoo"), str):
        from lighten.models import ZOO

        if spec["zoo"] in ZOO:
            makers.append(lambda: ZOO[spec["zoo"]](
                num_classes=manifest["num_classes"], input_shape=tuple(manifest["input_shape"]),
                **spec.get("kwargs", {})))
    edits = manifest.get("edits") if isinstance(manifest.get("edits"), list) else []
    for edit in edits:
        if not isinstance(edit, dict) or edit.get("op") != "module":
            if isinstance(edit, dict) and edit.get("op") == "tensor":
                makers.append(lambda e=edit: torch.empty(e["shape"], dtype=getattr(torch,
                                                                                  e["dtype"])))
            continue
        if "type" in edit:
            makers.append(lambda e=edit: get_module_type(e["type"]).from_artifact(e["config"]))
        else:
            makers.append(lambda e=edit: build_layer(e["layer"], e["attrs"]))
    total = 0
    for make in makers:
        try:
            with torch.device("meta"), torch.random.fork_rng(devices=[]):
                built = make()
        except Exception:  # noqa: BLE001 - the real build names what is wrong with it
            continue
        tensors = [built] if isinstance(built, torch.Tensor) else [
            *built.parameters(), *built.buffers()] if isinstance(built, nn.Module) else []
        total += sum(t.nelement() * t.element_size() for t in tensors)
        if total > limit:
            raise CheckpointError(f"{path}'s manifest builds a model of over {total >> 20} MiB "
                                  f"from a file of {path.stat().st_size} bytes (at most "
                                  f"{limit >> 20} MiB fit); the file is corrupt or hostile, "
                                  "re-save it")


def _dtype(path: Path, name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{path}: unknown dtype {name!r} in manifest; re-save it")
    return dtype


def _check_fits(path: Path, model: nn.Module, state: dict) -> None:
    """One readable line instead of load_state_dict's multi-line RuntimeError."""
    expected = model.state_dict()
    problems = [f"missing {k!r}" for k in expected if k not in state]
    problems += [f"unexpected {k!r}" for k in state if k not in expected]
    problems += [f"{k!r} is {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model"
                 for k, v in expected.items() if k in state and v.shape != state[k].shape]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: "
                              f"{'; '.join(problems[:3])}{more}; tensor/shape mismatch — pass the "
                              "model it was saved from as load_artifact(..., model=...)")


def check_finite(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """NaN or infinite values for ``model``'s parameters in ``state`` (a diverged training, a
    damaged file) are one clear error before loading, never a model that silently outputs NaN.
    Buffers may hold them (masks of -inf, observers' empty ranges)."""
    for name, _ in model.named_parameters():
        p = state.get(name)
        if p is None:
            continue
        if (p.is_floating_point() or p.is_complex()) and not bool(torch.isfinite(p).all()):
            nan, inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
            raise CheckpointError(f"{path}: parameter {name!r} holds {nan} NaN and {inf} "
                                  "infinite values; these weights are broken (a diverged "
                                  "training or a damaged file): use an earlier checkpoint")


def _retie(model: nn.Module, entries: dict) -> None:
    """Tensors saved as one (``alias``: an LM head tied to its embedding, tied layers'
    quantized weights) are one object again, so fine-tuning the reloaded model keeps them
    tied and it counts them once."""
    for name, entry in entries.items():
        if entry.get("encoding") != "alias":
            continue
        owner_path, _, attr = name.rpartition(".")
        src_path, _, src_attr = entry["of"].rpartition(".")
        owner, source = get_submodule(model, owner_path), get_submodule(model, src_path)
        param = source._parameters.get(src_attr)
        if param is not None and attr in owner._parameters:
            owner._parameters[attr] = param
        buffer = source._buffers.get(src_attr)  # a quantized tied weight (int8, scales)
        if buffer is not None and owner._buffers.get(attr) is not None:
            owner._buffers[attr] = buffer


def _match_dtypes(model: nn.Module, state: dict) -> None:
    """Give skeleton tensors the stored dtype (an int8 buffer stays int8, a half model half)."""
    for name, t in state.items():
        owner_path, _, attr = name.rpartition(".")
        owner = get_submodule(model, owner_path)
        param = owner._parameters.get(attr)
        if param is not None and param.dtype != t.dtype:
            if param.requires_grad and not (t.is_floating_point() or t.is_complex()):
                raise CheckpointError(
                    f"the artifact stores parameter {name!r} as {t.dtype}, but a trainable "
                    f"parameter must be floating point (the model's is {param.dtype}): the "
                    "file's manifest is damaged or was edited; save the artifact again")
            param.data = param.data.to(t.dtype)
        buf = owner._buffers.get(attr)
        if buf is not None and buf.dtype != t.dtype:
            owner._buffers[attr] = buf.to(t.dtype)


# ----------------------------------------------------------------------------- inspect


def artifact_bytes(path: str | os.PathLike) -> int:
    """Size of the artifact on disk: the number reports call ``bytes``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"artifact {path} does not exist; check the path")
    return path.stat().st_size


def describe_artifact(path: str | os.PathLike) -> list[dict]:
    """Per tensor: name, encoding, dtype, shape and the bytes it takes in the file."""
    path = Path(path)
    entries, parts = _read_stored(path, _read_manifest(path))
    rows = []
    for name, entry in entries.items():
        keys = {"dense": [name], "sparse_bitmask": [f"{name}#mask", f"{name}#values"],
                "packed_bits": [f"{name}#packed"],
                "sparse_packed_bits": [f"{name}#mask", f"{name}#packed"],
                "palette": [f"{name}#palette", f"{name}#index"],
                "sparse_palette": [f"{name}#mask", f"{name}#palette", f"{name}#index"]}
        base = entry.get("base", entry["encoding"])  # entropy-coded: the parts of its base
        stored = sum(parts[k].nbytes for k in keys.get(base, []) if k in parts)
        rows.append({"name": name, "encoding": entry["encoding"], "dtype": entry["dtype"],
                     "shape": entry["shape"], "bytes": stored})
    return rows

