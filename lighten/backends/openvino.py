"""OpenVINO on CPU (optional extra): reads the same verified ONNX file as onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from lighten.backends import default_threads, random_batch
from lighten.errors import BackendError
from lighten.measure.latency import median_latency_ms


class OpenVinoCompiled:
    backend = "openvino"

    def __init__(self, compiled_model, *, input_shape, onnx_path: Path, info):
        self._model = compiled_model
        self.input_shape = tuple(input_shape)
        self.bytes_on_disk = onnx_path.stat().st_size
        self.info = info

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self._model(x)[0])

    def latency_ms(self, batch: int, *, warmup: int = 10, runs: int = 50) -> float:
        x = random_batch(batch, self.input_shape)
        return median_latency_ms(lambda: self._model(x), warmup=warmup, runs=runs)


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, *, threads: int | None = None):
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            raise BackendError("backend 'openvino' needs OpenVINO; "
                               "pip install 'lighten[openvino]'") from exc
        self.threads = threads or default_threads()

    def compile(
        self, model: nn.Module, *, input_shape, workdir: Path, sample_inputs=None
    ) -> OpenVinoCompiled:
        import openvino as ov

        from lighten.export import export_onnx

        workdir = Path(workdir)
        onnx_path = workdir / "model.onnx"
        export_onnx(model, onnx_path, input_shape=tuple(input_shape), verify=True,
                    sample_inputs=sample_inputs)
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1}
        try:
            compiled = core.compile_model(str(onnx_path), "CPU", config)
        except Exception as exc:
            raise BackendError(f"OpenVINO cannot compile {onnx_path}: "
                               f"{str(exc).splitlines()[0]}") from exc
        info = {"onnx_path": str(onnx_path), "threads": self.threads}
        return OpenVinoCompiled(compiled, input_shape=input_shape, onnx_path=onnx_path, info=info)
