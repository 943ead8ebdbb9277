"""Where a result came from: library versions, the machine, the deployment target, the recipe
hash, the time.

Recorded in every artifact and report so a number can be traced back to what produced it. Also
home of the atomic file writers the artifact, runner and report share: a reader never sees a
half-written file, and a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lighten.errors import RecipeError
from lighten.target import (
    SPEED_FEATURES,
    Target,
    cpu_features,
    cpu_model,
    this_machine_cpu,
)

__all__ = ["NOT_INSTALLED", "SPEED_FEATURES", "atomic_write_bytes", "atomic_write_text",
           "canonical_json", "cpu_features", "describe_machine", "machine", "provenance",
           "recipe_hash", "versions"]

NOT_INSTALLED = "not installed"

# Distribution names whose versions explain a measurement (read from package metadata, so
# asking for them never imports onnxruntime or onnx).
_DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "numpy")


def versions() -> dict[str, str]:
    """Versions of lighten, its numeric stack and Python; "not installed" for missing ones."""
    found = {"lighten": _lighten_version()}
    for dist in _DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = NOT_INSTALLED
    found["python"] = platform.python_version()
    return found


def _lighten_version() -> str:
    try:
        return metadata.version("lighten")
    except metadata.PackageNotFoundError:
        pass
    # Running from a source checkout that was never pip-installed.
    import lighten

    return str(getattr(lighten, "__version__", "unknown (source checkout)"))


def machine() -> dict[str, Any]:
    """The hardware a timing was taken on: CPU model, cores (all and usable), threads, RAM."""
    import torch

    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_class": this_machine_cpu(),  # what deploy cpu: auto resolves to here
        "logical_cores": logical,
        "available_cores": usable,
        "cpu_quota": _cgroup_cpu_quota(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "ram_gb": _total_ram_gb(),
    }


def describe_machine(m: dict[str, Any]) -> str:
    """One line for a benchmark footer: CPU, usable cores, the kernel-relevant features."""
    features = "/".join(m.get("cpu_features") or []) or "features unknown"
    return f"{m['cpu']} ({m['available_cores']} usable cores; {features})"


def _cgroup_cpu_quota() -> float | None:
    """CPUs granted by a container limit (cgroup v2 ``cpu.max``); None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return round(int(quota) / int(period), 2)


def _total_ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        return None


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces, pydantic models and dataclasses as dicts."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):  # pydantic model
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise RecipeError(
        f"cannot hash a recipe value of type {type(obj).__name__}; use plain JSON values "
        "(str, number, bool, list, dict)"
    )


def recipe_hash(obj: Any) -> str:
    """First 16 hex chars of the sha256 of the canonical JSON: equal recipes, equal hashes."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]


def provenance(recipe: Any | None = None, seed: int | None = None, *,
               target: Target | None = None) -> dict[str, Any]:
    """Everything needed to trace a result: versions, machine, the deployment target (and what
    steps derived from it), recipe hash, seed, UTC time."""
    return {
        "versions": versions(),
        "machine": machine(),
        "target": (target or Target.this_machine()).to_dict(),
        "recipe_hash": None if recipe is None else recipe_hash(recipe),
        "seed": seed,
        "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> int:
    """Write ``data`` to ``path`` all-or-nothing; returns the number of bytes written.

    A temp file in the same directory is written, fsynced and renamed over ``path``
    (``os.replace`` is atomic on one filesystem). On any error the temp file is removed and an
    existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return len(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> int:
    """:func:`atomic_write_bytes` for UTF-8 text; returns the number of bytes written."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not possible on every platform, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
