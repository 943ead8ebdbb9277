"""Lossless bit-level codecs for artifact tensors: packed b-bit integers, sparse bit masks, value
palettes (few distinct values -> a table plus packed indices), and many small tensors joined into
one byte blob.

Pure functions on tensors, no file format: :mod:`lighten.artifact` decides which encoding a
tensor gets and records it in the manifest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["RAW_DTYPES", "index_bits", "join_tensors", "nonzero_mask", "pack_bitmask",
           "pack_bits", "packed_width", "palette_of", "palette_values", "split_tensors",
           "unpack_bitmask", "unpack_bits"]


def packed_width(values: torch.Tensor) -> tuple[int, int]:
    """(bits, offset): the fewest bits that hold every ``value - offset``, offset = min value."""
    if values.numel() == 0:
        return 0, 0
    low, high = int(values.min()), int(values.max())
    return (high - low).bit_length(), low


def pack_bits(values: torch.Tensor, *, bits: int, offset: int) -> torch.Tensor:
    """Integer tensor -> uint8 of ceil(n * bits / 8): ``value - offset`` in ``bits`` bits each.

    Little-endian bit order: element i occupies bits [i*bits, (i+1)*bits) of the byte stream, so
    4-bit values go two per byte with the first in the low nibble (ONNX's int4 layout).
    """
    if not 0 <= bits <= 64:
        raise ValueError(f"bits must be in 0..64, got {bits}")
    flat = values.detach().cpu().contiguous().reshape(-1).numpy().astype(np.int64)
    # uint64 wrap-around arithmetic gives the exact difference even for extreme int64 ranges
    delta = flat.view(np.uint64) - np.array(offset, dtype=np.int64).view(np.uint64)
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole elements per byte, no bit planes needed
        per_byte = 8 // bits
        padded = np.zeros(math.ceil(len(delta) / per_byte) * per_byte, dtype=np.uint8)
        padded[: len(delta)] = delta.astype(np.uint8)
        lanes = padded.reshape(-1, per_byte)
        packed = np.zeros(len(lanes), dtype=np.uint8)
        for i in range(per_byte):
            packed |= lanes[:, i] << np.uint8(i * bits)
        return torch.from_numpy(packed)
    planes = (delta[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)  # (n, bits)
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, *, bits: int, offset: int, count: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` values of ``dtype``, bit for bit."""
    raw = packed.detach().cpu().contiguous().numpy()
    if bits == 0:
        delta = np.zeros(count, dtype=np.uint64)
    elif 8 % bits == 0:
        per_byte = 8 // bits
        lanes = [(raw >> np.uint8(i * bits)) & np.uint8((1 << bits) - 1) for i in range(per_byte)]
        delta = np.stack(lanes, axis=1).reshape(-1)[:count].astype(np.uint64)
    else:
        planes = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
        delta = (planes.astype(np.uint64) << np.arange(bits, dtype=np.uint64)).sum(
            axis=1, dtype=np.uint64)
    value = (delta + np.array(offset, dtype=np.int64).view(np.uint64)).view(np.int64)
    return torch.from_numpy(value).to(dtype)


def pack_bitmask(t: torch.Tensor, *,
                 nonzero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` -> (packed bit mask, uint8 of ceil(n/8) bytes; its non-zero values in t.dtype)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if nonzero is None:
        nonzero = nonzero_mask(flat)
    mask = torch.from_numpy(np.packbits(nonzero.numpy()))  # (ceil(n/8),) uint8
    return mask, flat[nonzero].clone()


def unpack_bitmask(mask: torch.Tensor, values: torch.Tensor, *, dtype: torch.dtype,
                   shape) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: every value comes back bit for bit, -0.0 as +0.0."""
    n = math.prod(shape)
    nonzero = torch.from_numpy(np.unpackbits(mask.numpy(), count=n).astype(bool))
    out = torch.zeros(n, dtype=dtype)
    out[nonzero] = values
    return out.reshape(tuple(shape))


def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """True where the value is not zero. NaNs are kept with their payload; -0.0 counts as zero
    (pruning by ``w * mask`` leaves many) and comes back as +0.0, an equal value."""
    return t.reshape(-1) != 0


# Integer dtype of each item size: a palette compares values by their bits through this view, so
# -0.0 and +0.0 or NaNs with different payloads are distinct entries and come back bit for bit.
_BIT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def palette_of(values: torch.Tensor, *, max_size: int = 1 << 16
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """1-D ``values`` -> (table of its distinct values, int64 index of each value into it), or
    None when there are more than ``max_size`` distinct values. Values are compared bit for bit
    (the table is sorted by bit pattern), so ``palette_values`` rebuilds them exactly."""
    flat = values.detach().cpu().contiguous().reshape(-1)
    bits = flat.view(_BIT_VIEW[flat.element_size()])
    table, index = torch.unique(bits, sorted=True, return_inverse=True)
    if table.numel() > max_size:
        return None
    return table.view(flat.dtype), index


def palette_values(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`palette_of`: ``table[index]`` gathered on the bits (exact for NaNs)."""
    bits = table.contiguous().view(_BIT_VIEW[table.element_size()])
    return bits[index.long()].view(table.dtype)


def index_bits(size: int) -> int:
    """Bits per index into a table of ``size`` entries (0 for a single entry)."""
    return max(size - 1, 0).bit_length()


# dtypes whose bytes are plainly their values (what safetensors stores); not quantized types.
RAW_DTYPES = frozenset(getattr(torch, name) for name in (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64", "float16",
    "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "complex64")
    if hasattr(torch, name))


def join_tensors(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[list]]:
    """Many small tensors -> one uint8 tensor of their raw bytes end to end, plus the index.

    The index is ``[[key, dtype, shape], ...]`` in storage order; offsets follow from
    dtype x shape, so it holds no numbers that would not compress. Bytes are the tensors' own
    (little-endian on every platform torch runs on), so :func:`split_tensors` is bit-exact.
    """
    chunks, index = [], []
    for key, t in parts.items():
        if t.dtype not in RAW_DTYPES:
            raise ValueError(f"{key!r} is {t.dtype}, whose bytes are not plain values")
        t = t.detach().cpu().contiguous()
        chunks.append(t.reshape(-1).view(torch.uint8))  # (numel * itemsize,)
        index.append([key, str(t.dtype).removeprefix("torch."), list(t.shape)])
    blob = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)
    return blob, index


def split_tensors(blob: torch.Tensor, index: list) -> dict[str, torch.Tensor]:
    """Inverse of :func:`join_tensors`; ValueError names the first entry that does not fit."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"blob is {blob.dtype} of shape {tuple(blob.shape)}, not 1-D uint8")
    if not isinstance(index, list):
        raise ValueError(f"index is {type(index).__name__}, not a list")
    parts: dict[str, torch.Tensor] = {}
    start = 0
    for item in index:
        key, dtype, shape = _index_entry(item)
        if key in parts:
            raise ValueError(f"{key!r} is listed twice")
        end = start + math.prod(shape) * dtype.itemsize
        if end > blob.numel():
            raise ValueError(f"{key!r} ends at byte {end}, past the blob's {blob.numel()}")
        parts[key] = blob[start:end].clone().view(dtype).reshape(shape)  # own aligned storage
        start = end
    if start != blob.numel():
        raise ValueError(f"the index covers {start} of the blob's {blob.numel()} bytes")
    return parts


MAX_ELEMENTS = 2**62  # torch counts elements in int64, even when a 0 dim makes the tensor empty


def fits_int64(shape) -> bool:
    """Whether torch can hold a tensor of ``shape`` (a list of non-negative ints): the product
    of its dims, zeros read as ones, must fit torch's int64 element count."""
    return (all(type(d) is int and d >= 0 for d in shape)
            and math.prod(max(d, 1) for d in shape) < MAX_ELEMENTS)


def _index_entry(item) -> tuple[str, torch.dtype, tuple[int, ...]]:
    ok = isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
    dtype = getattr(torch, item[1], None) if ok and isinstance(item[1], str) else None
    shape = item[2] if ok else None
    if (dtype not in RAW_DTYPES or not isinstance(shape, list)
            or not fits_int64(shape)):
        raise ValueError(f"index entry {item!r} is not [key, dtype, shape]")
    return item[0], dtype, tuple(shape)
