"""``arch.nas`` latency predictor: a per-layer lookup table measured on the deployment backend.

Timing every candidate as a whole would cost an ONNX export and a session per candidate and
per width tried while fitting the budget. Instead each Conv / Linear layer configuration
(type, channels, kernel, stride, groups, input shape) is written as a one-node ONNX model
(:func:`layer_onnx`), timed once on the target backend at batch 1 (interleaved rounds,
``lighten.measure.timing``) and kept in a table (``latency_table.json`` in the search folder,
so a resumed search does not time them again). A candidate's prediction is the sum over its
layers, each less the cost of one session call (timed on a near-empty one-node model), which
a layer inside a model does not pay. What the sum misses (adds, pooling, the model's own call;
BatchNorm and ReLU fold into the convs on ONNX Runtime) is calibrated by one linear fit
``measured ~ a * sum + c * layers + b`` on a few whole models timed together: the input model,
uniformly narrowed copies and, where the space drops blocks, its shallowest shape at two
widths. The per-layer term is what a dropped block also saves besides its convs (its add, its
activations, one kernel launch each): with only ``a * sum + b`` fitted on full-depth models,
shallow candidates were predicted 10-14% slow. Its median relative error is then reported on
*other* models (the search's best candidates), each timed as a whole.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lighten.errors import UnsupportedError

__all__ = ["LatencyTable", "measure_models"]

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _layer_key(m: nn.Module, shape: tuple[int, ...]) -> str:
    if isinstance(m, nn.Linear):
        facts = [m.in_features, m.out_features, m.bias is not None]
    else:
        facts = [m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride),
                 list(m.padding), list(m.dilation), m.groups, m.bias is not None]
    return json.dumps([type(m).__name__, facts, list(shape)])


def _layers(model: nn.Module, example: tuple) -> list[tuple[str, nn.Module, tuple]]:
    """(key, layer, input shape without batch) of every Conv / Linear call, forward order."""
    found: list[tuple[str, nn.Module, tuple]] = []

    def hook(module, args) -> None:
        shape = tuple(args[0].shape[1:])
        found.append((_layer_key(module, shape), module, shape))

    if not any(p.is_meta for p in model.parameters()):  # shapes only: no arithmetic
        model = copy.deepcopy(model).to("meta")
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, LAYERS)]
    try:
        with torch.no_grad():
            model.eval()(*(x[:1].to("meta") for x in example))
    finally:
        for h in handles:
            h.remove()
    return found


def layer_onnx(layer: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    """A one-node ONNX model of ``layer`` at input ``shape`` (random weights: only the shapes
    matter for time). Written directly with onnx.helper: no PyTorch export per layer, which
    would cost more than the timing itself."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    if isinstance(layer, nn.Linear):
        w = rng.standard_normal((layer.in_features, layer.out_features), dtype=np.float32)
        inits = [numpy_helper.from_array(w, "W")]
        nodes = [helper.make_node("MatMul", ["input", "W"], ["mm" if layer.bias is not None
                                                            else "logits"])]
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(np.zeros(layer.out_features, np.float32), "B"))
            nodes.append(helper.make_node("Add", ["mm", "B"], ["logits"]))
    else:
        w = rng.standard_normal((layer.out_channels, layer.in_channels // layer.groups,
                                 *layer.kernel_size), dtype=np.float32)
        inits = [numpy_helper.from_array(w, "W")]
        names = ["input", "W"]
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(np.zeros(layer.out_channels, np.float32), "B"))
            names.append("B")
        pads = list(layer.padding) * 2
        nodes = [helper.make_node("Conv", names, ["logits"], kernel_shape=list(layer.kernel_size),
                                  strides=list(layer.stride), pads=pads,
                                  dilations=list(layer.dilation), group=layer.groups)]
    graph = helper.make_graph(nodes, "layer", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def _compile_layer(be, layer: nn.Module, shape: tuple[int, ...], workdir: Path):
    if not callable(getattr(be, "compile_file", None)):
        raise UnsupportedError(f"arch.nas latency budget: the {be.name} backend cannot time "
                               "ONNX files; deploy on onnxruntime or openvino, or give "
                               "target_macs / target_params / target_bytes")
    workdir.mkdir(parents=True, exist_ok=True)
    layer_onnx(layer, shape, workdir / "model.onnx")
    return be.compile_file(workdir / "model.onnx", input_shape=shape)


def _compile(be, module: nn.Module, workdir: Path, *, input_shape=None, inputs=None):
    from lighten.export import export_onnx

    workdir.mkdir(parents=True, exist_ok=True)
    export_onnx(copy.deepcopy(module).eval(), workdir / "model.onnx", input_shape=input_shape,
                inputs=inputs, verify=False)
    loaded = be.load(workdir, input_shape=input_shape, inputs=inputs)
    if loaded is None:
        raise UnsupportedError(f"arch.nas latency budget: the {be.name} backend cannot time "
                               "ONNX files; deploy on onnxruntime or openvino, or give "
                               "target_macs / target_params / target_bytes")
    return loaded


def measure_models(models: list[nn.Module], *, backend: str, threads: int | None, inputs,
                   runs: int) -> list[float]:
    """Batch-1 median latency (ms) of each whole model, all timed together in rounds."""
    from lighten.backends import get_backend
    from lighten.measure.timing import time_interleaved

    be = get_backend(backend, threads=threads)
    with tempfile.TemporaryDirectory(prefix="lighten-nas-") as tmp:
        compiled = [_compile(be, m, Path(tmp) / str(i), inputs=inputs)
                    for i, m in enumerate(models)]
        stats = time_interleaved(compiled, runs=runs, batches=(1,)).stats[1]
    return [s.median for s in stats]


@dataclass
class LatencyTable:
    """Measured per-layer latencies (ms, batch 1) and the affine calibration on top."""

    backend: str
    threads: int | None
    runs: int = 20
    path: Path | None = None  # JSON cache: layer key -> ms
    ms: dict[str, float] = field(default_factory=dict)
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0  # ms per Conv / Linear call
    overhead: float | None = None  # ms of one call of a near-empty layer model
    # (layer sum, measured, layers) per calibration model
    calibration: list[tuple[float, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.path is not None and Path(self.path).is_file():
            saved = json.loads(Path(self.path).read_text())
            self.ms.update(saved.get("layers", {}))
            self.overhead = saved.get("overhead")
            self.calibration = [tuple(p) for p in saved.get("calibration", [])]
            if self.calibration:
                self._fit()

    def _save(self) -> None:
        if self.path is not None:
            Path(self.path).write_text(json.dumps(
                {"backend": self.backend, "threads": self.threads, "layers": self.ms,
                 "overhead": self.overhead, "calibration": self.calibration}, indent=0))

    def _time_layers(self, todo: dict[str, tuple[nn.Module, tuple]]) -> None:
        from lighten.backends import get_backend
        from lighten.measure.timing import time_interleaved

        be = get_backend(self.backend, threads=self.threads)
        keys = list(todo)
        if self.overhead is None:  # a 1x1 conv on one pixel: what a call costs by itself
            todo["overhead"] = (nn.Conv2d(1, 1, 1), (1, 1, 1))
            keys.append("overhead")
        with tempfile.TemporaryDirectory(prefix="lighten-nas-layers-") as tmp:
            compiled = [_compile_layer(be, todo[k][0], todo[k][1], Path(tmp) / str(i))
                        for i, k in enumerate(keys)]
            stats = time_interleaved(compiled, runs=self.runs, batches=(1,)).stats[1]
        times = {k: s.median for k, s in zip(keys, stats, strict=True)}
        if "overhead" in times:
            self.overhead = times.pop("overhead")
        self.ms.update(times)
        self._save()

    def layer_sum(self, model: nn.Module, example: tuple) -> float:
        """Sum of the table's latencies over ``model``'s layers (timing any it lacks)."""
        return self._sum_calls(model, example)[0]

    def _sum_calls(self, model: nn.Module, example: tuple) -> tuple[float, int]:
        layers = _layers(model, example)
        todo = {k: (m, shape) for k, m, shape in layers if k not in self.ms}
        if todo:
            self._time_layers(todo)
        # a layer timed alone includes one session call, which a whole model pays once
        total = sum(max(self.ms[k] - (self.overhead or 0.0), 0.0) for k, _, _ in layers)
        return total, len(layers)

    def _fit(self) -> None:
        self.c = 0.0
        points = self.calibration
        if all(len(p) == 3 for p in points) and len({p[2] for p in points}) >= 2 \
                and len(points) >= 4:
            x = torch.tensor([[p[0], p[2], 1.0] for p in points], dtype=torch.float64)
            y = torch.tensor([[p[1]] for p in points], dtype=torch.float64)
            a, c, b = torch.linalg.lstsq(x, y).solution.flatten().tolist()
            if a > 0 and c >= 0:  # else noise swamped a term: the two-term fit below
                self.a, self.c, self.b = a, c, b
                return
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if len(xs) < 2 or max(xs) - min(xs) < 1e-9:
            self.a, self.b = sum(ys) / max(sum(xs), 1e-12), 0.0
            return
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        self.a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / \
            sum((x - mx) ** 2 for x in xs)
        self.b = my - self.a * mx
        if self.a <= 0:  # timing noise swamped the trend: a fit through 0
            self.a = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
            self.b = 0.0

    def calibrate(self, models: list[nn.Module], example: tuple, inputs) -> list[float]:
        """Fit ``measured ~ a * sum + b`` on ``models`` timed whole; their measured ms."""
        sums = [self._sum_calls(m, example) for m in models]
        measured = measure_models(models, backend=self.backend, threads=self.threads,
                                  inputs=inputs, runs=self.runs)
        self.calibration = [(x, y, n) for (x, n), y in zip(sums, measured, strict=True)]
        self._fit()
        self._save()
        return measured

    def predict(self, model: nn.Module, example: tuple) -> float:
        total, calls = self._sum_calls(model, example)
        return max(0.0, self.a * total + self.c * calls + self.b)

    def errors(self, models: list[nn.Module], example: tuple, inputs
               ) -> list[tuple[float, float]]:
        """(predicted, measured) ms of each model (models the fit did not see)."""
        predicted = [self.predict(m, example) for m in models]
        measured = measure_models(models, backend=self.backend, threads=self.threads,
                                  inputs=inputs, runs=self.runs)
        return list(zip(predicted, measured, strict=True))
