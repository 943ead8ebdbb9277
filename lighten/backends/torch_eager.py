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

from lighten.backends import default_threads
from lighten.errors import BackendError, LightenError
from lighten.measure.latency import median_latency_ms
from lighten.task import input_specs, random_arrays


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

    def __init__(self, model: nn.Module, *, input_shape=None, threads: int,
                 info: dict[str, Any], inputs=None):
        self.model = model
        self.inputs = input_specs(input_shape, inputs)
        self.input_shape = tuple(self.inputs[0].shape)
        self.threads = threads
        self.info = info

    def _run(self, *xs: torch.Tensor) -> torch.Tensor:
        with pinned_threads(self.threads), torch.inference_mode():
            return self.model(*xs)

    def __call__(self, *xs: np.ndarray) -> np.ndarray:
        """Outputs for one batch per model input (token ids stay int64)."""
        args = [torch.from_numpy(np.ascontiguousarray(
            x, dtype=np.float32 if spec.is_float else np.int64))
            for x, spec in zip(xs, self.inputs, strict=True)]
        return self._run(*args).float().numpy()

    def latency_ms(self, batch: int, *, warmup: int = 10, runs: int = 50) -> float:
        xs = [torch.from_numpy(a) for a in random_arrays(self.inputs, batch)]
        with pinned_threads(self.threads), torch.inference_mode():
            return median_latency_ms(lambda: self.model(*xs), warmup=warmup, runs=runs)


class TorchBackend:
    name = "torch"

    def __init__(self, *, threads: int | None = None):
        self.threads = threads or default_threads()

    def compile(
        self, model: nn.Module, *, input_shape=None, workdir: Path, sample_inputs=None,
        inputs=None, metadata=None,
    ) -> TorchCompiled:
        """Copy ``model`` in eval mode (the caller's model is left untouched); int8 if quantized.
        No file is written, so ``metadata`` (ONNX metadata_props) has nowhere to go."""
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
        specs = input_specs(input_shape, inputs)
        compiled = TorchCompiled(deployed, inputs=specs, threads=self.threads, info=info)
        try:
            compiled(*random_arrays(specs, 2))
        except Exception as exc:
            shapes = ", ".join(str(tuple(s.shape)) for s in specs)
            raise BackendError(f"torch backend cannot run {type(model).__name__} on input shape "
                               f"{shapes}: {str(exc).splitlines()[0]}") from exc
        return compiled

    def load(self, workdir: Path, *, input_shape=None, inputs=None) -> None:
        """Nothing to load: this backend writes no file; the stage's artifact is the deployed
        model (the runner loads it and calls :meth:`compile`, which does not export)."""
        return None


def _is_quantized(model: nn.Module) -> bool:
    """True when lighten.quant exists and finds quantized modules in ``model``."""
    try:
        from lighten.quant import is_quantized
    except ImportError:  # quantization not installed/built yet: nothing can be quantized
        return False
    return bool(is_quantized(model))
