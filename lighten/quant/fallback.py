"""``quant.ptq {fallback: auto}``: keep a layer in float where its int8 form is slower on the
deployment backend.

Integer kernels do not win everywhere: a thin or depthwise conv, or a layer whose input and
output must be converted to and from int8 because its neighbours are float, can run slower as
QLinearConv than as a float conv. So each quantized layer is timed *on the deployment backend*
in two forms with its real input shape at batch 64: its int8 form as exported (quantize the
input, integer kernel, dequantize the output: what it costs beside float neighbours) and its
float form (the conv/linear with its ReLU). All layers' forms are timed together in interleaved
rounds (:func:`lighten.measure.timing.time_interleaved`), and :func:`choose_float` keeps the
faster form of each. Timing the int8 form with its conversions is deliberately conservative: a
layer kept in int8 wins even alone.

Then the whole model is timed every-layer-int8 and with sets of the losing layers in float
(:func:`candidate_sets`: the one, two, four, ... that lose the most, and all of them), all
together, and the fastest set is kept only when the model with it is faster: a float layer
between int8 ones adds conversions that the per-layer timing cannot see. "Faster" means
clearly: the whole model's spread (IQR across rounds) with the fallbacks lies below the
all-int8 one's; on a tie every layer stays int8. Where OpenVINO is installed and the
deployment backend is ONNX Runtime, the int8 file is also timed on OpenVINO and a note says so
when it is faster there (the step never switches runtimes by itself).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

BATCH = 64  # the batch the decision is taken at (the stage table's b64 column)
RUNS = 30  # timed runs per form, spread over interleaved rounds


@dataclass(frozen=True)
class LayerTiming:
    """One layer on the deployment backend at :data:`BATCH`: medians in milliseconds."""

    int8_ms: float
    float_ms: float


def choose_float(timings: Mapping[str, LayerTiming | tuple[float, float]]) -> list[str]:
    """Names of the layers to keep in float: those whose measured float time is lower than
    their int8 time (``(int8_ms, float_ms)`` pairs or :class:`LayerTiming`); ties stay int8."""
    out = []
    for name, t in timings.items():
        int8_ms, float_ms = (t.int8_ms, t.float_ms) if isinstance(t, LayerTiming) else t
        if float_ms < int8_ms:
            out.append(name)
    return sorted(out)


def candidate_sets(timings: Mapping[str, LayerTiming | tuple[float, float]],
                   losing: list[str]) -> list[list[str]]:
    """Which sets of the losing layers to time as whole models: the 1, 2, 4, ... layers that
    lose the most milliseconds, and all of them. Each float layer among int8 ones adds
    conversions, so the layers that lose little alone may not pay back their conversions,
    while one that loses a lot (a conv on a 1-channel input) does."""
    def loss(name):
        t = timings[name]
        int8_ms, float_ms = (t.int8_ms, t.float_ms) if isinstance(t, LayerTiming) else t
        return int8_ms - float_ms

    ranked = sorted(losing, key=lambda n: (-loss(n), n))
    sizes, k = [], 1
    while k < len(ranked):
        sizes.append(k)
        k *= 2
    sizes.append(len(ranked))
    return [sorted(ranked[:k]) for k in sizes]


def _float_form(float_layer: nn.Module, activation: str) -> nn.Module:
    act = {"relu": nn.ReLU(), "relu6": nn.ReLU6()}.get(activation)
    return nn.Sequential(float_layer, act) if act is not None else float_layer


def _deploy(backend, module: nn.Module, shape, workdir: Path):
    """``module`` exported (unverified: it is timed, not shipped) and opened on ``backend``."""
    from lighten.export import export_onnx

    workdir.mkdir(parents=True, exist_ok=True)
    export_onnx(module, workdir / "model.onnx", input_shape=shape, verify=False)
    return backend.load(workdir, input_shape=shape)


def measure_layers(model: nn.Module, float_model: nn.Module, plan, shapes: Mapping[str, tuple],
                   *, backend_name: str, threads: int | None, workdir: Path
                   ) -> dict[str, LayerTiming]:
    """Every quantized layer of ``model`` in its int8 and float form, timed together."""
    from lighten.backends import get_backend
    from lighten.measure.timing import time_interleaved
    from lighten.quant.modules import _QuantLayer

    backend = get_backend(backend_name, threads=threads)
    names, compiled = [], []
    for i, (name, lp) in enumerate(plan.layers.items()):
        layer = model.get_submodule(name)
        if not isinstance(layer, _QuantLayer) or name not in shapes:
            continue
        forms = [_deploy(backend, copy.deepcopy(layer).eval(), shapes[name],
                         workdir / f"{i}-int8"),
                 _deploy(backend, _float_form(copy.deepcopy(float_model.get_submodule(name)),
                                              lp.activation).eval(), shapes[name],
                         workdir / f"{i}-float")]
        if any(f is None for f in forms):
            return {}
        names.append(name)
        compiled += forms
    if not compiled:
        return {}
    stats = time_interleaved(compiled, runs=RUNS, batches=(BATCH,)).stats[BATCH]
    return {name: LayerTiming(stats[2 * k].median, stats[2 * k + 1].median)
            for k, name in enumerate(names)}


def with_float_layers(model: nn.Module, float_model: nn.Module, plan, names) -> nn.Module:
    """``model`` (in place) with the layers ``names`` back in float, their ReLUs restored."""
    for name in names:
        model.set_submodule(name, copy.deepcopy(float_model.get_submodule(name)))
        absorbed = plan.layers[name].absorbed_module
        if absorbed:
            model.set_submodule(absorbed, copy.deepcopy(float_model.get_submodule(absorbed)))
    return model


def apply_fallback(model: nn.Module, float_model: nn.Module, plan, shapes: Mapping[str, tuple],
                   *, target, backend: str, notes: list[str]) -> list[str]:
    """Put the layers whose int8 form loses back in float (in place); returns their names."""
    from lighten.backends import get_backend
    from lighten.measure.timing import time_interleaved

    if backend == "torch":
        notes.append("quant.ptq fallback: auto times layers on onnxruntime or openvino; the "
                     "torch backend keeps every layer int8")
        return []
    with tempfile.TemporaryDirectory(prefix="lighten-fallback-") as tmp:
        work = Path(tmp)
        timings = measure_layers(model, float_model, plan, shapes, backend_name=backend,
                                 threads=target.threads, workdir=work / "layers")
        losing = choose_float(timings)
        chosen = losing
        shape = shapes.get("<input>")
        be = get_backend(backend, threads=target.threads)
        if chosen and shape is not None:  # the whole model decides, conversions included
            sets = candidate_sets(timings, losing)
            whole = [_deploy(be, model, shape, work / "all-int8")]
            for k, names in enumerate(sets):
                candidate = with_float_layers(copy.deepcopy(model), float_model, plan, names)
                whole.append(_deploy(be, candidate, shape, work / f"fallback-{k}"))
            stats = time_interleaved(whole, runs=RUNS, batches=(BATCH,)).stats[BATCH]
            all_int8 = stats[0].median
            best = min(range(1, len(stats)), key=lambda k: stats[k].median)
            if stats[best].high >= stats[0].low:  # not clearly faster: the spreads overlap
                notes.append(f"quant.ptq fallback: auto: {len(losing)} layer(s) lose alone in "
                             f"int8 but the whole model is not clearly faster with any of them "
                             f"in float (best {stats[best].median:.3g} vs {all_int8:.3g} ms "
                             f"all-int8 at batch {BATCH} on {backend}); all kept int8")
                chosen = []
            else:
                chosen = sets[best - 1]
                notes.append(f"quant.ptq fallback: auto: {len(chosen)} of {len(timings)} layers "
                             f"kept in float ({stats[best].median:.3g} vs {all_int8:.3g} ms "
                             f"all-int8 at batch {BATCH} on {backend}; {len(losing)} lose alone, "
                             f"{len(sets)} sets of them timed whole)")
        with_float_layers(model, float_model, plan, chosen)
        for name in chosen:
            t = timings[name]
            notes.append(f"{name} left in float: int8 {t.int8_ms:.3g} ms vs float "
                         f"{t.float_ms:.3g} ms at batch {BATCH} on {backend} (fallback: auto)")
        if shape is not None and backend == "onnxruntime":
            _openvino_note(be, model, shape, work, notes, threads=target.threads)
    return chosen


def _openvino_note(ort_backend, model, shape, work: Path, notes, *, threads) -> None:
    """Say when the same int8 file runs faster on OpenVINO (a recommendation, never a switch)."""
    from lighten.backends import get_backend
    from lighten.errors import BackendError
    from lighten.measure.timing import time_interleaved

    try:
        ov = get_backend("openvino", threads=threads)
    except BackendError:
        return
    ort = _deploy(ort_backend, model, shape, work / "final")
    try:
        ov_compiled = ov.load(work / "final", input_shape=shape)
    except BackendError:
        return
    stats = time_interleaved([ort, ov_compiled], runs=RUNS, batches=(BATCH,)).stats[BATCH]
    if stats[1].high < stats[0].low:
        notes.append(f"quant.ptq: this int8 model runs {stats[0].median / stats[1].median:.2f}x "
                     f"faster on openvino than on onnxruntime ({stats[1].median:.3g} vs "
                     f"{stats[0].median:.3g} ms at batch {BATCH}, timed together); set deploy: "
                     "{backend: openvino} to measure and ship it there (the file is the same)")
