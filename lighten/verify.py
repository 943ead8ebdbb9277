"""Integrity of artifacts and run folders: every stored byte checked against digests written at
save time (``lighten verify``).

An artifact's manifest holds ``sha256``: per stored tensor stream (safetensors entry, in key
order) the first 64 bits of the sha256 of its dtype, shape and bytes -- any flipped bit,
truncation or swapped stream is found, at ~11 bytes per stream. A digest detects damage, it
does not prove authorship: whoever rewrites a file can rewrite its digests too.

A run folder's ``checksums.json`` (written by the runner after every stage and at the end) holds
the full sha256 of each file the run's results rest on (stages, metrics, state, run record,
reference outputs, latency); ``verify_run`` also checks each stage artifact's own digests, that
every finished stage has its file, and that ``stages/`` holds no file the run did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lighten.errors import CheckpointError

__all__ = ["CHECKSUMS", "file_sha256", "stream_digest", "stream_digests", "verify_artifact",
           "verify_path", "verify_run", "write_checksums"]

CHECKSUMS = "checksums.json"
# Files of a run folder whose bytes the results rest on; report.md/html and plots are derived
# (``lighten report`` rewrites them) and not recorded.
_RECORDED = ("run.json", "state.json", "metrics.jsonl", "reference_logits.safetensors",
             "latency.json")
_DIGEST_HEX = 16  # 64 bits of sha256 per stream
# What a stage writes into stages/: its artifact, its layer table and its step report.
_STAGE_SUFFIXES = (".safetensors", ".layers.json", ".report.json")


def stream_digest(key: str, t: torch.Tensor) -> str:
    """The first 64 bits of sha256(key, dtype, shape, raw bytes) of one stored tensor."""
    h = hashlib.sha256(f"{key}\0{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:_DIGEST_HEX]


def stream_digests(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Digests of the tensors a safetensors file stores, in sorted key order."""
    return [stream_digest(key, tensors[key]) for key in sorted(tensors)]


def verify_artifact(path: str | os.PathLike) -> int:
    """Check every stored stream of an artifact against its manifest digests and decode every
    tensor (no model is built, no code runs); returns the number of streams checked. Any
    damage is one CheckpointError line naming the stream."""
    from safetensors import safe_open

    from lighten.artifact import _decode_state, _read_manifest, _read_stored

    path = Path(path)
    manifest = _read_manifest(path)  # header, envelope, zlib, JSON: damage fails here
    digests = manifest.get("sha256")
    if digests is None:
        raise CheckpointError(f"{path} records no stream digests (saved by an older lighten); "
                              "re-save it to make it verifiable")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors' own error types
        raise CheckpointError(f"{path} is truncated or corrupt ({str(err)[:120]})") from None
    _check_envelope(path, metadata, manifest)
    keys = sorted(stored)
    if not isinstance(digests, list) or len(digests) != len(keys):
        raise CheckpointError(f"{path} stores {len(keys)} tensor streams but its manifest "
                              f"records {len(digests) if isinstance(digests, list) else 0} "
                              "digests; the file is damaged")
    for key, expected in zip(keys, digests, strict=True):
        if stream_digest(key, stored[key]) != expected:
            raise CheckpointError(f"{path}: stored stream {key!r} does not match its sha256; "
                                  "the file is damaged, re-save or re-download it")
    entries, parts = _read_stored(path, manifest)
    coder = manifest.get("coder")
    if coder:
        from lighten.artifact import _uncode

        entries, parts = _uncode(path, coder, entries, parts)
    _decode_state(path, entries, parts)
    return len(keys)


def _check_envelope(path: Path, metadata: dict, manifest: dict) -> None:
    """The header parts outside the digests are exactly what save_artifact writes: metadata
    keys, the envelope's version, canonical base64 (unused low bits of its last character)."""
    import base64
    import binascii

    from lighten.artifact import METADATA_KEY

    problem = None
    envelope = json.loads(metadata[METADATA_KEY])
    packed = envelope.get("zlib") if isinstance(envelope, dict) else None
    if set(metadata) != {"format", METADATA_KEY} or metadata["format"] != "pt":
        problem = f"its safetensors metadata is {sorted(metadata)!r}, not format + lighten"
    elif envelope.get("version") != manifest.get("version"):
        problem = "its envelope and manifest versions differ"
    elif set(envelope) - {"format", "version", "zlib", "saved_at"}:
        problem = "its manifest envelope has unknown keys"
    elif isinstance(packed, str):
        try:
            canonical = base64.b64encode(base64.b64decode(packed, validate=True)).decode()
        except (binascii.Error, ValueError):
            canonical = None
        if canonical != packed:
            problem = "its compressed manifest is not canonical base64"
    if problem:
        raise CheckpointError(f"{path}: {problem}; the file is damaged")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(out: Path, *, finished: bool = False) -> None:
    """Record the sha256 of the run's result files (called after each stage and at the end).
    ``finished``: the run's last write, so it also marks the run complete (:func:`run_finished`);
    a run killed after its last stage but before this (timing, report) is not."""
    from lighten.provenance import atomic_write_text

    out = Path(out)
    files = [out / name for name in _RECORDED]
    stages = out / "stages"
    if stages.is_dir():
        files += sorted(p for p in stages.iterdir() if p.is_file() and not p.name.startswith("."))
    record = {p.relative_to(out).as_posix(): file_sha256(p) for p in files if p.is_file()}
    atomic_write_text(out / CHECKSUMS, json.dumps({"version": 1, "finished": finished,
                                                   "sha256": record}, indent=1))


def run_finished(out: Path) -> bool:
    """Whether the run in ``out`` wrote its last file (:func:`write_checksums` ``finished``).
    A run recorded before that mark existed counts as finished when its run.json says so and
    its report is there."""
    out = Path(out)
    try:
        record = json.loads((out / CHECKSUMS).read_text())
        if "finished" in record:
            return record["finished"] is True
        status = json.loads((out / "run.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return False
    return status == "finished" and (out / "report.md").is_file()


def verify_run(out: str | os.PathLike) -> tuple[int, list[str]]:
    """Check a run folder; returns (files checked, problems), a problem per line."""
    out = Path(out)
    problems: list[str] = []
    try:
        state = json.loads((out / "state.json").read_text())
        done = list(state["done"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{out} holds no readable state.json; is it a lighten run "
                              "folder?") from None
    try:
        record = json.loads((out / CHECKSUMS).read_text())["sha256"]
    except FileNotFoundError:
        record = None
        problems.append(f"{CHECKSUMS} is missing (a run by an older lighten, or deleted): only "
                        "the stage artifacts' own digests are checked")
    except (OSError, ValueError, KeyError, TypeError):
        record = None
        problems.append(f"{CHECKSUMS} is damaged")
    expected = {f"{i:02d}-{name}" for i, name in enumerate(done)}
    stages = out / "stages"
    present = sorted(p for p in stages.iterdir() if p.is_file()) if stages.is_dir() else []
    for stem in sorted(expected):
        if not (stages / f"{stem}.safetensors").is_file():
            problems.append(f"stages/{stem}.safetensors is missing (a finished stage)")
    for p in present:
        stem = next((p.name[:-len(s)] for s in _STAGE_SUFFIXES if p.name.endswith(s)), None)
        if stem not in expected:
            problems.append(f"stages/{p.name} is an extra file no finished stage wrote")
    checked = 0
    for p in present:
        if p.name.endswith(".safetensors") and p.name[:-len(".safetensors")] in expected:
            checked += 1
            try:
                verify_artifact(p)
            except CheckpointError as err:
                problems.append(str(err).replace(str(out) + os.sep, ""))
    if record is not None:
        for rel, digest in sorted(record.items()):
            path = out / rel
            checked += 1
            if not path.is_file():
                problems.append(f"{rel} is missing (recorded in {CHECKSUMS})")
            elif file_sha256(path) != digest:
                problems.append(f"{rel} differs from the sha256 recorded in {CHECKSUMS}")
        for p in present:
            rel = p.relative_to(out).as_posix()
            if rel not in record and p.name[:-len(".safetensors")] in expected:
                problems.append(f"{rel} is not in {CHECKSUMS} (written after the run?)")
    return checked, problems


def verify_path(path: str | os.PathLike) -> tuple[str, int, list[str]]:
    """``lighten verify``: an artifact file or a run folder -> (kind, items checked, problems)."""
    path = Path(path)
    if path.is_dir():
        checked, problems = verify_run(path)
        return "run folder", checked, problems
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass an artifact (.safetensors) or a "
                              "run folder")
    return "artifact", verify_artifact(path), []
