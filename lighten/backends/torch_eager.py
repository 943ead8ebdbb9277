"""Eager PyTorch on CPU: the reference runtime, and PyTorch's int8 engine for quantized models.

A model holding lighten's quantized modules is converted with ``lighten.quant.to_torch_int8``
so the timing reflects real int8 kernels, not fake quantization in float.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lighten.backends import default_threads, random_batch
from lighten.errors import BackendError, LightenError
from lighten.measure.latency import median_latency_ms


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads, then restore the caller's setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchCompiled:
    backend = "torch"
    bytes_on_disk = None  # nothing is written; the artifact is the deployed file

    def __init__(self, model: nn.Module, *, input_shape, threads: int, info: dict[str, Any]):
        self.model = model
        self.input_shape = tuple(input_shape)
        self.threads = threads
        self.info = info

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with pinned_threads(self.threads), torch.inference_mode():
            return self.model(x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return self._run(x).float().numpy()

    def latency_ms(self, batch: int, *, warmup: int = 10, runs: int = 50) -> float:
        x = torch.from_numpy(random_batch(batch, self.input_shape))
        with pinned_threads(self.threads), torch.inference_mode():
            return median_latency_ms(lambda: self.model(x), warmup=warmup, runs=runs)


class TorchBackend:
    name = "torch"

    def __init__(self, *, threads: int | None = None):
        self.threads = threads or default_threads()

    def compile(
        self, model: nn.Module, *, input_shape, workdir: Path, sample_inputs=None
    ) -> TorchCompiled:
        """Copy ``model`` in eval mode (the caller's model is left untouched); int8 if quantized."""
        deployed = copy.deepcopy(model).eval()
        engine = "fp32"
        if _is_quantized(deployed):
            from lighten.quant import to_torch_int8

            try:
                deployed = to_torch_int8(deployed).eval()
            except LightenError as exc:
                raise BackendError(f"torch backend cannot run this quantized model: {exc}") from exc
            engine = f"int8 ({torch.backends.quantized.engine})"
        info = {"threads": self.threads, "engine": engine}
        compiled = TorchCompiled(deployed, input_shape=input_shape, threads=self.threads,
                                 info=info)
        try:
            compiled(random_batch(2, input_shape))
        except Exception as exc:
            raise BackendError(f"torch backend cannot run {type(model).__name__} on input shape "
                               f"{tuple(input_shape)}: {str(exc).splitlines()[0]}") from exc
        return compiled


def _is_quantized(model: nn.Module) -> bool:
    """True when lighten.quant exists and finds quantized modules in ``model``."""
    try:
        from lighten.quant import is_quantized
    except ImportError:  # quantization not installed/built yet: nothing can be quantized
        return False
    return bool(is_quantized(model))
