"""ONNX Runtime on CPU: the default deployment target.

The model is exported with verification, so what is timed is what was checked. The optimized
graph ORT actually executes is saved next to it and its op types are recorded: that is how a
quantized model proves it runs integer kernels (QLinearConv, MatMulInteger, ...) rather than
dequantizing back to float.
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

_INTEGER_OPS = {"QGemm", "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "ConvInteger",
                "MatMulInteger", "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM"}


# ORT 1.32's CPU SkipLayerNormalization (the fusion of Add + LayerNormalization) runs 8-30x
# slower than the two ops it replaces (measured: (64, 49, 128) 3.7 vs 0.47 ms, (8, 197, 384)
# 8.6 vs 0.72 ms, 1 thread, AVX-512 EPYC); it fires wherever the Add's shapes are known.
DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]

# ORT's worker threads keep spin-waiting for a while after a run ends. With two models in one
# process on 2 cores (every interleaved timing, a user's pipeline), the next model's run shares
# the cores with the last one's spinning threads: on a 2-vCPU VM an int8 model alternated between
# 7-8 and 15 ms spells next to its float twin. Spinning stays on during a run, where it helps,
# and stops when the run returns (benchmarks/results/ort_spinning.md).
SESSION_CONFIG = {"session.force_spinning_stop": "1"}


def session_options(threads: int | None = None):
    """lighten's ORT session options: ``threads`` intra-op threads (None: all usable cores), one
    inter-op thread, sequential execution, every graph optimization, and :data:`SESSION_CONFIG`.
    Every session lighten times is opened with these, so models compare on equal terms."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # the NCHWc "hardware specific" warning is expected
    for key, value in SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    return opts


def integer_ops(op_types: dict[str, int]) -> list[str]:
    """The op types in ``op_types`` that compute on integers."""
    return sorted(op for op in op_types if op.startswith("QLinear") or op in _INTEGER_OPS)


class OrtCompiled:
    backend = "onnxruntime"

    def __init__(self, session, *, input_shape=None, onnx_path: Path, info: dict[str, Any],
                 inputs=None):
        self._session = session
        self._names = [i.name for i in session.get_inputs()]
        self.inputs = input_specs(input_shape, inputs)
        self.input_shape = tuple(self.inputs[0].shape)
        self.onnx_path = onnx_path
        self.bytes_on_disk = onnx_path.stat().st_size
        self.info = info

    def __call__(self, *xs: np.ndarray) -> np.ndarray:
        """Outputs for one batch per model input (token ids stay int64)."""
        if len(xs) != len(self._names):
            raise BackendError(f"onnxruntime: the model takes {len(self._names)} input(s), "
                               f"got {len(xs)}")
        feed = {name: np.ascontiguousarray(x, dtype=np.float32 if spec.is_float else np.int64)
                for name, x, spec in zip(self._names, xs, self.inputs, strict=True)}
        return self._session.run(None, feed)[0]

    def latency_ms(self, batch: int, *, warmup: int = 10, runs: int = 50) -> float:
        feed = dict(zip(self._names, random_arrays(self.inputs, batch), strict=True))
        return median_latency_ms(lambda: self._session.run(None, feed), warmup=warmup, runs=runs)

    def deployment(self) -> dict[str, Any]:
        """What another process needs to open this model again: backend, file, threads."""
        threads = self._session.get_session_options().intra_op_num_threads
        return {"backend": self.backend, "path": str(self.onnx_path), "threads": threads}


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, *, threads: int | None = None):
        self.threads = threads or default_threads()

    def compile(
        self, model: nn.Module, *, input_shape=None, workdir: Path, sample_inputs=None,
        inputs=None, metadata=None,
    ) -> OrtCompiled:
        """``inputs`` (``task.inputs``) for models that are not one float tensor in;
        ``metadata`` goes into the ONNX file's metadata_props (task, preprocessing)."""
        from lighten.export import export_onnx

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        onnx_path = workdir / "model.onnx"
        optimized_path = workdir / "model.optimized.onnx"
        specs = input_specs(input_shape, inputs)
        check = export_onnx(model, onnx_path, inputs=specs, verify=True,
                            sample_inputs=sample_inputs, metadata=metadata)
        session = self._session(onnx_path, optimized_path)
        ops = _op_types(optimized_path)
        info = {
            "onnx_path": str(onnx_path),
            "optimized_path": str(optimized_path),
            "threads": self.threads,
            "op_types": ops,
            "integer_ops": integer_ops(ops),
            "export_max_abs_diff": check.max_abs_diff,
            "export_agreement": check.agreement,
            "export_check": check.row(),  # batch 1 and batch 64, on what inputs
            "int8_weight_tensors": check.folded_weights,
        }
        return OrtCompiled(session, inputs=specs, onnx_path=onnx_path, info=info)

    def load(self, workdir: Path, *, input_shape=None, inputs=None) -> OrtCompiled | None:
        """The deployment :meth:`compile` wrote to ``workdir`` (``model.onnx``), opened again
        without exporting (the runner's end-of-run timing); None when there is none."""
        workdir = Path(workdir)
        onnx_path, optimized_path = workdir / "model.onnx", workdir / "model.optimized.onnx"
        if not onnx_path.is_file():
            return None
        session = self._session(onnx_path, optimized_path)
        ops = _op_types(optimized_path)
        info = {"onnx_path": str(onnx_path), "optimized_path": str(optimized_path),
                "threads": self.threads, "op_types": ops, "integer_ops": integer_ops(ops)}
        return OrtCompiled(session, input_shape=input_shape, inputs=inputs, onnx_path=onnx_path,
                           info=info)

    def compile_file(self, path: str | Path, *, input_shape=None, inputs=None) -> OrtCompiled:
        """Open an existing ONNX file (another tool's, or one timed again in a fresh process);
        no export, no PyTorch check. ORT's optimized graph goes next to it."""
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"onnxruntime: no model file at {path}; export it first")
        optimized_path = path.with_suffix(".optimized.onnx")
        session = self._session(path, optimized_path)
        ops = _op_types(optimized_path)
        info = {"onnx_path": str(path), "optimized_path": str(optimized_path),
                "threads": self.threads, "op_types": ops, "integer_ops": integer_ops(ops)}
        return OrtCompiled(session, input_shape=input_shape, inputs=inputs, onnx_path=path,
                           info=info)

    def _session(self, onnx_path: Path, optimized_path: Path):
        import onnxruntime as ort

        opts = session_options(self.threads)
        opts.optimized_model_filepath = str(optimized_path)
        try:
            session = ort.InferenceSession(str(onnx_path), opts,
                                           providers=["CPUExecutionProvider"],
                                           disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime cannot load {onnx_path}: "
                               f"{str(exc).splitlines()[0]}; re-export with a supported opset"
                               ) from exc
        return session


def _op_types(path: Path) -> dict[str, int]:
    """Op type -> count in the graph ORT saved after optimization (contrib ops included)."""
    import onnx

    if not path.exists():
        return {}
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))
