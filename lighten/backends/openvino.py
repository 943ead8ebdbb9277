"""OpenVINO on CPU (optional extra): runs the same verified ONNX file as onnxruntime.

Why a second runtime for the same file: on x86 CPUs without VNNI, ONNX Runtime's QLinearConv is
often *slower* than float for small models, while OpenVINO turns the QuantizeLinear /
DequantizeLinear pairs of our QDQ export into FakeQuantize nodes and fuses them into int8
convolutions and fully connected layers (oneDNN's u8 x s8 kernels).

How we know it really runs int8: the compiled model's *runtime* graph (``get_runtime_model()``)
carries, per executed node, ``layerType`` and ``runtimePrecision``. A compute layer
(Convolution, FullyConnected, MatMul, ...) with runtime precision ``u8``/``i8`` runs integer
kernels; one with ``f32`` was dequantized. Both counts go into ``info``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lighten.backends import default_threads
from lighten.errors import BackendError
from lighten.measure.latency import median_latency_ms
from lighten.task import input_specs, random_arrays

COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected",
                  "MatMul", "Gemm"}
INT_PRECISIONS = {"u8", "i8"}
MIN_AGREEMENT = 0.95  # OpenVINO vs PyTorch top-1 on the sample inputs (QDQ rounding differs)


def runtime_precisions(compiled_model) -> dict[str, Any]:
    """Per compute layer type, how often OpenVINO executes it in each precision.

    Read from the runtime graph: every node's rt_info has ``layerType`` (the CPU plugin's node
    kind after fusion) and ``runtimePrecision`` (the input precision its kernel computes in).
    """
    by_kind: Counter[str] = Counter()
    for op in compiled_model.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        if layer not in COMPUTE_LAYERS:
            continue
        precision = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
        by_kind[f"{layer}:{precision}"] += 1
    int8 = sum(n for key, n in by_kind.items() if key.split(":")[1] in INT_PRECISIONS)
    return {"compute_layers": sum(by_kind.values()), "int8_layers": int8,
            "layer_precisions": dict(sorted(by_kind.items()))}


class OpenVinoCompiled:
    backend = "openvino"

    def __init__(self, compiled_model, *, input_shape=None, model_path: Path,
                 info: dict[str, Any], inputs=None):
        self._model = compiled_model
        self._request = compiled_model.create_infer_request()
        self.inputs = input_specs(input_shape, inputs)
        self.input_shape = tuple(self.inputs[0].shape)
        self.bytes_on_disk = _file_bytes(model_path)
        self.model_path = Path(model_path)
        self.info = info

    def __call__(self, *xs: np.ndarray) -> np.ndarray:
        """Outputs for a batch of any size (compiled with a dynamic batch axis), one array per
        model input."""
        if len(xs) != len(self.inputs):
            raise BackendError(f"openvino: the model takes {len(self.inputs)} input(s), "
                               f"got {len(xs)}")
        feed = {}
        for i, (x, spec) in enumerate(zip(xs, self.inputs, strict=True)):
            x = np.ascontiguousarray(x, dtype=np.float32 if spec.is_float else np.int64)
            if x.shape[1:] != tuple(spec.shape):
                raise BackendError(f"openvino: input shape {x.shape[1:]} differs from the "
                                   f"compiled {tuple(spec.shape)}; pass arrays of shape "
                                   f"(B, *{tuple(spec.shape)})")
            feed[i] = x
        out = self._request.infer(feed)
        return np.array(out[self._model.output(0)], copy=True)  # the request reuses its buffer

    def latency_ms(self, batch: int, *, warmup: int = 10, runs: int = 50) -> float:
        feed = dict(enumerate(random_arrays(self.inputs, batch)))
        return median_latency_ms(lambda: self._request.infer(feed), warmup=warmup, runs=runs)

    def deployment(self) -> dict[str, Any]:
        """What another process needs to compile this model again: backend, file, threads."""
        threads = int(self._model.get_property("INFERENCE_NUM_THREADS"))
        return {"backend": self.backend, "path": str(self.model_path), "threads": threads}


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
        self, model: nn.Module, *, input_shape=None, workdir: Path, sample_inputs=None,
        inputs=None, metadata=None,
    ) -> OpenVinoCompiled:
        """Export (verified in ONNX Runtime), compile in OpenVINO, check it against PyTorch."""
        import torch

        from lighten.export import DEFAULT_SAMPLES, export_onnx

        specs = input_specs(input_shape, inputs)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        onnx_path = workdir / "model.onnx"
        check = export_onnx(model, onnx_path, inputs=specs, verify=True,
                            sample_inputs=sample_inputs, metadata=metadata)
        compiled = self.compile_file(onnx_path, inputs=specs)

        if sample_inputs is None:
            sample_inputs = tuple(torch.from_numpy(a)
                                  for a in random_arrays(specs, DEFAULT_SAMPLES))
        samples = (tuple(sample_inputs) if isinstance(sample_inputs, (tuple, list))
                   else (sample_inputs,))
        with torch.no_grad():
            ref = model.eval()(*samples).numpy()
        got = compiled(*(t.numpy() for t in samples))
        agreement = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
        diff = float(np.abs(got - ref).max())
        if agreement < MIN_AGREEMENT:
            raise BackendError(f"openvino disagrees with PyTorch on {onnx_path}: top-1 agreement "
                               f"{agreement:.2f} < {MIN_AGREEMENT}, max |diff| {diff:.3g}; "
                               "deploy on onnxruntime instead")
        compiled.info.update(openvino_max_abs_diff=diff, openvino_agreement=agreement,
                             export_max_abs_diff=check.max_abs_diff,
                             export_check=check.row(),
                             int8_weight_tensors=check.folded_weights)
        return compiled

    def load(self, workdir: Path, *, input_shape=None, inputs=None) -> OpenVinoCompiled | None:
        """The deployment :meth:`compile` wrote to ``workdir`` (``model.onnx``, checked then),
        compiled again without exporting (the runner's end-of-run timing); None when absent."""
        path = Path(workdir) / "model.onnx"
        if not path.is_file():
            return None
        return self.compile_file(path, input_shape=input_shape, inputs=inputs)

    def compile_file(self, path: str | Path, *, input_shape=None,
                     inputs=None) -> OpenVinoCompiled:
        """Compile an existing ONNX or OpenVINO IR (.xml) file; no export, no PyTorch check.

        Used for files made by other tools (e.g. NNCF or ``onnxruntime.quantize_static``).
        """
        import openvino as ov

        path = Path(path)
        if not path.exists():
            raise BackendError(f"openvino: no model file at {path}; export it first")
        # f32 pinned: on CPUs with AVX512-BF16 / AMX, OpenVINO would otherwise run every float
        # layer in bf16 (logits off by ~1%), so a "float" row would not be float. int8 layers
        # of a QDQ file still run in int8.
        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        try:
            compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises bare RuntimeError with multi-line text
            raise BackendError(f"OpenVINO cannot compile {path}: "
                               f"{str(exc).strip().splitlines()[0]}") from exc
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        info = {"model_path": str(path), "threads": self.threads,
                "inference_precision": precision.to_string(),
                **runtime_precisions(compiled)}
        return OpenVinoCompiled(compiled, input_shape=input_shape, inputs=inputs,
                                model_path=path, info=info)


def _file_bytes(path: Path) -> int:
    """Bytes of the deployed model: an IR .xml counts with its .bin weights."""
    size = path.stat().st_size
    weights = path.with_suffix(".bin")
    if path.suffix == ".xml" and weights.exists():
        size += weights.stat().st_size
    return size
