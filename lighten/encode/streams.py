"""Entropy coding of an artifact's stored parts: the storage layer behind ``encode.entropy``.

An artifact stores each tensor as parts (:func:`lighten.artifact._encode_tensor`): a bit mask of
non-zeros, packed b-bit integers (quantized weights, palette indices), plain integers (int8
weights), float values or tables. Each part is a stream of symbols with a skewed distribution —
the mask of a 95%-sparse layer carries ~0.29 bits per entry, not 1; 4-bit cluster indices of a
bell-shaped weight ~3.4 bits, not 4 — and the exponent byte of float32 values ~3 bits, not 8.
This module codes those streams with an order-0 model per stream: the symbol counts, stored in
the manifest, are the model; the coded words replace the part's bytes.

Why ``constriction`` (its ANS coder, ``constriction.stream.stack.AnsCoder``) and not zstd or a
hand-written Huffman coder: ANS with a categorical model of the exact counts codes within a few
bytes of the Shannon bound ``n * H(counts)`` per stream (Huffman loses up to 1 bit per symbol,
which is most of the 0.29 bits a mask entry needs; zstd models bytes, not 1-, 4- or 7-bit
symbols packed across byte boundaries), and it is a maintained, vectorized library, so encoding
and decoding a million symbols takes milliseconds. Probabilities are ``counts / n`` in float64
passed to ``Categorical(perfect=False)``, which quantizes them deterministically, so the loader
rebuilds exactly the encoder's model from the stored counts.

The manifest of a coded artifact names the coder (``coder``: :data:`CODER`); the loader refuses
one it does not know. A coded tensor's manifest entry is its plain entry with ``encoding:
entropy``, ``base`` (the encoding of the parts once decoded) and ``streams`` {part suffix (""
for the tensor's own part): {"kind", "subs": [...]}}; each sub is ``{"counts": [...], "words":
w}`` (w 32-bit ANS words in the part, in order) or ``{"raw": nbytes}`` (bytes kept as they
are). Kinds:

* ``bits``: a packed bit mask (``numpy.packbits`` order), one symbol per bit;
* ``packed``: b-bit packed integers (:func:`lighten.codecs.pack_bits`), one symbol per value;
* ``ints``: plain integers, ``value - offset`` per symbol (``offset`` in the stream);
* ``planes``: the tensor's bytes split into byte planes (byte j of every value), one sub each,
  kept raw where coding would not pay (float mantissas).

Decoding rebuilds the parts bit for bit; :func:`code_parts` checks that by rebuilding every part
before it keeps the coded form.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

# ENTROPY_FLAG: the attribute encode.entropy sets on a model; save_artifact then codes its parts
from lighten.artifact import ENTROPY_FLAG
from lighten.codecs import pack_bits, unpack_bits

__all__ = ["CODER", "ENTROPY_FLAG", "StreamStats", "code_parts", "decode_symbols",
           "empirical_bits", "encode_symbols", "uncode_parts"]

# Recorded in the manifest: which coder wrote the words (a future coder gets a new name).
CODER = "constriction-ans32"
# Parts smaller than this stay as they are: the counts table would cost more than coding saves.
_MIN_BYTES = 64
# Integer parts whose values span more than this many symbols stay as they are.
_MAX_ALPHABET = 1 << 16
_INTS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass
class StreamStats:
    """One coded part: what it held and what it costs now, against its Shannon bound."""

    tensor: str
    part: str            # "" (the tensor's own part), "mask", "index", "packed", "values", ...
    kind: str            # bits | packed | ints | planes
    symbols: int
    raw_bytes: int       # the part before coding
    coded_bytes: int     # the ANS words (plus raw byte planes)
    model_bytes: int     # the counts, as stored (zlib of their JSON): the price of the model
    entropy_bits: float  # sum over coded subs of n * H(empirical distribution)
    coded_bits: int      # 32 x words of the coded subs

    def row(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- symbols


def _model(counts: np.ndarray):
    import constriction

    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def encode_symbols(symbols: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Non-negative integer symbols -> (counts per symbol 0..max, uint32 ANS words).

    A stream of one repeated symbol needs no words at all."""
    import constriction

    symbols = np.ascontiguousarray(symbols, dtype=np.int32)
    counts = np.bincount(symbols, minlength=1) if symbols.size else np.zeros(1, np.int64)
    if np.count_nonzero(counts) <= 1:
        return counts.tolist(), np.zeros(0, dtype=np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, _model(counts))
    return counts.tolist(), coder.get_compressed()


def decode_symbols(words: np.ndarray, counts: list[int]) -> np.ndarray:
    """Inverse of :func:`encode_symbols`; ValueError when the words do not decode cleanly."""
    import constriction

    counts_np = np.asarray(counts, dtype=np.int64)
    if counts_np.ndim != 1 or counts_np.size == 0 or (counts_np < 0).any():
        raise ValueError(f"counts {counts!r} are not a list of non-negative integers")
    n = int(counts_np.sum())
    if np.count_nonzero(counts_np) <= 1:
        if words.size:
            raise ValueError("a single-symbol stream holds coded words")
        return np.full(n, int(counts_np.argmax()), dtype=np.int64)
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    out = np.asarray(coder.decode(_model(counts_np), n), dtype=np.int64)
    if not coder.is_empty():
        raise ValueError("coded words left over after the last symbol")
    if np.bincount(out, minlength=counts_np.size).tolist()[: counts_np.size] != counts_np.tolist():
        raise ValueError("decoded symbols do not match the stored counts")
    return out


def empirical_bits(counts) -> float:
    """``n * H``: the Shannon bound of an order-0 code of a stream with these symbol counts."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


def _model_bytes(subs: list[dict]) -> int:
    return len(zlib.compress(json.dumps(subs, separators=(",", ":")).encode(), 9))


# ----------------------------------------------------------------------------- parts


def _part_streams(entry: dict) -> dict[str, str]:
    """Part suffix -> stream kind for a tensor stored with ``entry`` (before coding)."""
    encoding, dtype = entry["encoding"], getattr(torch, entry["dtype"])
    values = "ints" if dtype in _INTS else "planes"
    return {"dense": {"": values},
            "sparse_bitmask": {"mask": "bits", "values": values},
            "packed_bits": {"packed": "packed"},
            "sparse_packed_bits": {"mask": "bits", "packed": "packed"},
            "palette": {"palette": values, "index": "packed"},
            "sparse_palette": {"mask": "bits", "palette": values, "index": "packed"},
            }.get(encoding, {})


def _count(entry: dict, suffix: str) -> int | None:
    """Values in a ``packed``/``bits`` part (None where the part's own shape says it)."""
    n = math.prod(entry["shape"])
    if suffix == "mask":
        return n
    sparse = entry["encoding"] in ("sparse_packed_bits", "sparse_palette")
    return entry["nnz"] if sparse else n


def _symbols(kind: str, part: torch.Tensor, entry: dict, suffix: str
             ) -> tuple[list[np.ndarray], dict] | None:
    """The part as symbol streams (one per sub) and the stream facts needed to rebuild it."""
    raw = part.contiguous().numpy()
    if kind == "bits":
        return [np.unpackbits(raw, count=_count(entry, suffix)).astype(np.int32)], {}
    if kind == "packed":
        values = unpack_bits(part, bits=entry["bits"], offset=0, count=_count(entry, suffix),
                             dtype=torch.int64)
        return [values.numpy()], {}
    flat = raw.reshape(-1)
    if kind == "ints":
        if flat.size == 0:
            return None
        low, high = int(flat.min()), int(flat.max())
        if high - low >= _MAX_ALPHABET:
            return None
        return [(flat.astype(np.int64) - low).astype(np.int64)], {"offset": low}
    planes = flat.view(np.uint8).reshape(flat.size, part.element_size())  # (n, itemsize)
    return [planes[:, j].astype(np.int32) for j in range(planes.shape[1])], {}


def _rebuild(kind: str, subs: list[np.ndarray], facts: dict, entry: dict, suffix: str,
             ) -> torch.Tensor:
    """The part from its symbol streams (inverse of :func:`_symbols`)."""
    # a float32 tensor whose values are all float16s is stored (and its planes coded) as float16
    dtype = getattr(torch, entry.get("stored_dtype", entry["dtype"]))
    if kind == "bits":
        return torch.from_numpy(np.packbits(subs[0].astype(np.uint8)))
    if kind == "packed":
        return pack_bits(torch.from_numpy(subs[0]), bits=entry["bits"], offset=0)
    shape = tuple(entry["shape"]) if suffix == "" else (len(subs[0]),)
    if kind == "ints":
        values = torch.from_numpy(subs[0] + int(facts["offset"]))
        return values.to(dtype).reshape(shape)
    planes = np.stack([s.astype(np.uint8) for s in subs], axis=1)  # (n, itemsize)
    return torch.from_numpy(planes.reshape(-1).copy()).view(dtype).reshape(shape)


def _code_part(kind: str, part: torch.Tensor, entry: dict, suffix: str
               ) -> tuple[torch.Tensor, dict, dict] | None:
    """(coded part, stream entry, stats facts) when coding saves bytes, else None."""
    found = _symbols(kind, part, entry, suffix)
    if found is None:
        return None
    streams, facts = found
    subs, chunks, bound, coded_bits, symbols = [], [], 0.0, 0, 0
    for symbols_j in streams:
        counts, words = encode_symbols(symbols_j)
        raw_j = symbols_j.astype(np.uint8).tobytes() if kind == "planes" else None
        if raw_j is not None and 4 * words.size + _model_bytes([{"counts": counts}]) >= len(raw_j):
            subs.append({"raw": len(raw_j)})  # this byte plane does not compress
            chunks.append(np.frombuffer(raw_j, dtype=np.uint8))
            continue
        subs.append({"counts": counts, "words": int(words.size)})
        chunks.append(words.astype("<u4").view(np.uint8))
        bound += empirical_bits(counts)
        coded_bits += 32 * int(words.size)
        symbols = len(symbols_j)
    if not any("counts" in s for s in subs):
        return None
    coded = torch.from_numpy(np.concatenate(chunks).copy())
    stream = {"kind": kind, "subs": subs, **facts}
    model = _model_bytes(subs)
    if coded.numel() + model >= part.numel() * part.element_size():
        return None
    if not torch.equal(_rebuild(kind, streams, facts, entry, suffix).view(torch.uint8),
                       part.contiguous().view(torch.uint8)):
        return None  # a part whose padding bits are not zero: keep it as it is
    stats = {"kind": kind, "symbols": symbols, "raw_bytes": part.numel() * part.element_size(),
             "coded_bytes": coded.numel(), "model_bytes": model, "entropy_bits": bound,
             "coded_bits": coded_bits}
    return coded, stream, stats


def code_parts(parts: dict[str, torch.Tensor], entries: dict[str, dict]
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[StreamStats]]:
    """Entropy-code every part of every tensor where that makes it smaller.

    ``parts``/``entries`` are what :func:`lighten.artifact._encode_state` returns; the result has
    the same shape, coded tensors' entries saying ``encoding: entropy`` (an older lighten then
    refuses the file by name instead of misreading it)."""
    parts, entries = dict(parts), {k: dict(e) for k, e in entries.items()}
    stats: list[StreamStats] = []
    for name, entry in entries.items():
        streams = {}
        for suffix, kind in _part_streams(entry).items():
            key = f"{name}#{suffix}" if suffix else name
            part = parts.get(key)
            if part is None or part.numel() * part.element_size() < _MIN_BYTES:
                continue
            coded = _code_part(kind, part, entry, suffix)
            if coded is None:
                continue
            parts[key], streams[suffix], facts = coded
            stats.append(StreamStats(tensor=name, part=suffix, **facts))
        if streams:
            entry.update(base=entry["encoding"], encoding="entropy", streams=streams)
    return parts, entries, stats


def uncode_parts(coder: str, entries: dict[str, dict], stored: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Inverse of :func:`code_parts` (``coder``: the manifest's); ValueError names the damage."""
    if coder != CODER:
        raise ValueError(f"its tensors are coded with {coder!r}, which this lighten does not "
                         "know; upgrade lighten")
    entries, stored = {k: dict(e) for k, e in entries.items()}, dict(stored)
    for name, entry in entries.items():
        if entry.get("encoding") != "entropy":
            continue
        streams = entry.pop("streams", None)
        entry["encoding"] = entry.pop("base", None)
        if not isinstance(streams, dict) or not isinstance(entry["encoding"], str):
            raise ValueError(f"tensor {name!r} has no valid coded streams")
        kinds = _part_streams(entry)
        for suffix, stream in streams.items():
            key = f"{name}#{suffix}" if suffix else name
            if kinds.get(suffix) != stream.get("kind") or key not in stored:
                raise ValueError(f"tensor {name!r} part {suffix!r} is not a coded "
                                 f"{kinds.get(suffix)} stream")
            stored[key] = _uncode_part(name, stream, stored[key], entry, suffix)
    return entries, stored


def _uncode_part(name: str, stream: dict, coded: torch.Tensor, entry: dict, suffix: str
                 ) -> torch.Tensor:
    data = coded.contiguous().numpy().view(np.uint8)
    subs, start = [], 0
    for sub in stream.get("subs", []):
        if "raw" in sub:
            end = start + int(sub["raw"])
            subs.append(data[start:end].astype(np.int64))
        else:
            end = start + 4 * int(sub["words"])
            words = np.frombuffer(data[start:end].tobytes(), dtype="<u4")
            subs.append(decode_symbols(words, sub["counts"]))
        start = end
    if start != data.size or not subs or len({len(s) for s in subs}) != 1:
        raise ValueError(f"tensor {name!r} part {suffix!r}: coded bytes do not match the "
                         "stream layout")
    return _rebuild(stream["kind"], subs, stream, entry, suffix)
