"""Deployment runtimes: where a compressed model runs, is timed, and is evaluated.

Every stage of a recipe is measured on the *compiled* model, so the accuracy in a report is
the accuracy of what ships, not of the PyTorch model it came from. Backends are a plain table
from name to class; runtimes are imported only when a backend is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BeforeValidator

from lighten.errors import BackendError, did_you_mean

if TYPE_CHECKING:  # the name table is read by the CLI parser: keep this import light
    import numpy as np
    from torch import nn


class Compiled(Protocol):
    backend: str  # the backend name, recorded in metrics.jsonl
    bytes_on_disk: int | None  # size of the deployed file (ONNX), if the backend writes one
    info: dict[str, Any]  # backend facts for the report (e.g. op types the runtime executes)

    # one array per model input, e.g. (B, *input_shape) float or (B, T) int64 ids -> outputs
    def __call__(self, *xs: np.ndarray) -> np.ndarray: ...

    def latency_ms(self, batch: int, *, warmup: int = 10, runs: int = 50) -> float: ...


class Backend(Protocol):
    name: str

    def compile(  # inputs (task.inputs) for models that are not one float tensor in
        self, model: nn.Module, *, input_shape=None, workdir: Path, sample_inputs=None,
        inputs=None, metadata=None,  # metadata: ONNX metadata_props, where a file is written
    ) -> Compiled: ...

    # what compile() wrote to workdir, opened again without exporting; None when it wrote
    # nothing there (torch) or the files are gone: compile the stage's artifact instead
    def load(self, workdir: Path, *, input_shape=None, inputs=None) -> Compiled | None: ...


def default_threads() -> int:
    """CPU cores this process may run on (respects taskset / container CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _onnxruntime(*, threads: int | None = None) -> Backend:
    from lighten.backends.onnxrt import OnnxRuntimeBackend

    return OnnxRuntimeBackend(threads=threads)


def _torch(*, threads: int | None = None) -> Backend:
    from lighten.backends.torch_eager import TorchBackend

    return TorchBackend(threads=threads)


def _openvino(*, threads: int | None = None) -> Backend:
    from lighten.backends.openvino import OpenVinoBackend

    return OpenVinoBackend(threads=threads)


# The one list of backend names: recipes (deploy.backend, quant.ptq backend), the CLI and the
# deployment target all validate against this table.
BACKENDS: dict[str, Callable[..., Backend]] = {
    "onnxruntime": _onnxruntime,
    "torch": _torch,
    "openvino": _openvino,
}
DEFAULT_BACKEND = "onnxruntime"


def check_backend(name: object) -> str:
    """``name`` if it is in :data:`BACKENDS`; else a ValueError naming them (pydantic turns it
    into the recipe's one-line error)."""
    if isinstance(name, str) and name in BACKENDS:
        return name
    raise ValueError(f"Input should be one of: {', '.join(BACKENDS)}"
                     f"{did_you_mean(name, BACKENDS)}")


# A config field holding a backend name (validated against the table, did-you-mean on a typo).
BackendName = Annotated[str, BeforeValidator(check_backend)]


def get_backend(name: str, *, threads: int | None = None) -> Backend:
    """Build backend ``name`` pinned to ``threads`` CPU threads (default: all available cores)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}{did_you_mean(name, BACKENDS)}; "
                           f"choose one of: {', '.join(BACKENDS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise BackendError(f"threads must be a positive integer, got {threads!r}; "
                           "omit it to use all available cores")
    return BACKENDS[name](threads=threads)


def random_batch(batch: int, input_shape, *, seed: int = 0) -> np.ndarray:
    """A fixed float32 batch for timing: same input for every backend and stage."""
    import numpy as np

    if batch < 1:
        raise BackendError(f"batch must be >= 1, got {batch}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *input_shape), dtype=np.float32)


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "Backend", "BackendName", "Compiled", "check_backend",
           "default_threads", "get_backend", "random_batch"]
