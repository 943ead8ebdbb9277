"""ONNX export that checks itself in ONNX Runtime and stores quantized weights as int8.

Why a post-pass: the TorchScript exporter turns ``fake_quantize_*`` into
QuantizeLinear -> DequantizeLinear on the *float* weight, so the file would still hold fp32
weights. Folding ``QuantizeLinear(constant)`` into an int8 initializer makes the file really
small and lets ONNX Runtime fuse DequantizeLinear -> Conv into integer kernels.

Why verify: a model that exports but computes something else is worse than one that fails.
The exported bytes run in ONNX Runtime against PyTorch before anything is written.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lighten.errors import ExportError
from lighten.provenance import atomic_write_bytes
from lighten.task import InputSpec

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
CHECK_BATCH = 64  # the self-check runs every sample at batch 1 and all together at this batch
DEFAULT_SAMPLES = CHECK_BATCH  # random inputs, only when no data is given
FLOAT_RTOL = 1e-4  # float graphs: atol = 1e-4 * max(1, max|ref|)
QUANT_RTOL = 0.1  # QDQ graphs: integer kernels round differently
QUANT_MIN_AGREEMENT = 0.95
# Ops whose presence makes a graph "quantized": integer kernels round differently from PyTorch's
# float reference, so such graphs get the looser check.
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
            "ConvInteger", "DynamicQuantizeLSTM"}
_FOLDABLE = (np.int8, np.uint8, np.int16, np.uint16)  # zero-point dtypes the fold handles


@dataclass
class ExportCheck:
    path: Path
    max_abs_diff: float | None  # None when verify=False
    agreement: float | None  # top-1 agreement with PyTorch on the sample inputs
    bytes: int
    quantized: bool = False  # the graph holds QuantizeLinear/DequantizeLinear nodes
    folded_weights: int = 0  # QuantizeLinear(weight) nodes turned into int8 initializers
    # batch size -> (max |diff|, top-1 agreement): 1 (each sample alone) and CHECK_BATCH
    by_batch: dict[int, tuple[float, float]] = field(default_factory=dict)
    inputs: str = ""  # what was checked: "given samples" or "random inputs (no data given)"

    def summary(self) -> str:
        """One line for terminals and notes: both batch sizes, and on what inputs."""
        if not self.by_batch:
            return "not verified"
        parts = [f"batch {b}: max |diff| {d:.2e}, top-1 agreement {100 * a:.1f}%"
                 for b, (d, a) in sorted(self.by_batch.items())]
        return f"{'; '.join(parts)} ({self.inputs})"

    def row(self) -> dict:
        """metrics.jsonl keys: export_max_diff_b1 / _b64, export_agreement_b1 / _b64,
        export_inputs."""
        out: dict = {}
        for b, (d, a) in sorted(self.by_batch.items()):
            out[f"export_max_diff_b{b}"] = d
            out[f"export_agreement_b{b}"] = a
        if self.by_batch:
            out["export_inputs"] = self.inputs
        return out


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    sample_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    verify: bool = True,
    atol: float | None = None,
    opset: int = 17,
    inputs: Sequence[InputSpec] | None = None,
    metadata: Mapping[str, str] | None = None,
    simplify: bool = True,
) -> ExportCheck:
    """Export ``model`` (eval mode) to ``path`` with a dynamic batch axis; verify in ORT.

    One float input of ``input_shape`` (ONNX input ``input``), or the task's ``inputs``
    (``task.inputs``: any number, int64 token ids included; one input keeps the name ``input``,
    several are named as their specs). ``sample_inputs`` is a batch tensor, or a tuple with one
    batch per input. Raises ExportError when the exporter fails, ORT cannot load the graph, or
    the outputs differ from PyTorch beyond tolerance. Nothing is written unless the export (and
    check) succeeded. ``metadata`` is written into the file's ``metadata_props`` (e.g.
    :func:`task_metadata`: what the model is for, its inputs, a language model's tokenizer).
    ``simplify=False`` skips :func:`lighten.graph.onnx_simplify.simplify` (for comparisons).
    """
    specs = _check_specs(input_shape, inputs)
    path = Path(path)
    _check_destination(path)
    was_training = model.training
    model.eval()
    try:
        frozen: list[str] = []
        proto = _torch_export(model, specs, opset, frozen)
        folded = fold_quantized_weights(proto)
        from lighten.quant.qdq_graph import complete_qdq

        complete_qdq(proto)  # exact Q->DQ after concats/shuffles/pools on an int8 grid
        if simplify:  # exact: x.size() arithmetic -> constants, int8 depthwise 16-padded
            from lighten.graph.onnx_simplify import simplify as simplify_graph

            simplify_graph(proto, quantized=any(n.op_type in _QDQ_OPS for n in proto.graph.node))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        data = proto.SerializeToString()
        quantized = any(n.op_type in _QDQ_OPS for n in proto.graph.node)
        max_diff = agree = None
        by_batch: dict[int, tuple[float, float]] = {}
        given = "given samples" if sample_inputs is not None else "random inputs (no data given)"
        if verify:
            if sample_inputs is None:
                sample_inputs = _default_samples(specs)
            # an embedding has no classes: the argmax of its vector is no prediction to agree on
            top1 = (metadata or {}).get("lighten.task.kind") != "embedding"
            try:
                by_batch = _verify(model, data, sample_inputs, specs, quantized=quantized,
                                   atol=atol, top1=top1)
            except ExportError as err:
                raise _blame_frozen_control_flow(err, frozen) from None
            max_diff = max(d for d, _ in by_batch.values())
            agree = min(a for _, a in by_batch.values())
    finally:
        model.train(was_training)
    atomic_write_bytes(path, data)
    return ExportCheck(path, max_diff, agree, len(data), quantized, folded, by_batch,
                       given if verify else "")


def _blame_frozen_control_flow(err: ExportError, frozen: list[str]) -> ExportError:
    """A graph that computes something else, traced through Python control flow: the frozen
    branch is the likely cause, and a looser tolerance would only ship the wrong graph."""
    text = str(err)
    # traced at batch 1: a frozen branch shows at the other batch size; a mismatch already at
    # batch 1 is numeric (an op, rounding), whatever the warnings said
    if not frozen or "does not match PyTorch at batch 1:" in text or \
            "does not match PyTorch" not in text:
        return err
    lines = "; ".join(frozen[:3]) + (f" (+{len(frozen) - 3} more)" if len(frozen) > 3 else "")
    return ExportError(
        text.split("; pass atol=")[0] + f"; the ONNX trace froze Python control flow at "
        f"{lines}: the graph always takes the branch the batch-1 example took. Make that code "
        "traceable (e.g. torch.where over tensors, no `if` on sizes or values), or run "
        "`lighten check` to see which modules it affects")


def _check_destination(path: Path) -> None:
    """Fail before exporting when ``path`` cannot become a file: a folder, or under a file."""
    if path.is_dir():
        raise ExportError(f"{path} is a folder; pass a file name for the ONNX model, e.g. "
                          f"{path / 'model.onnx'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"cannot write {path}: {parent} is a file, not a folder; choose "
                              "another path")


def _names(specs: Sequence[InputSpec]) -> list[str]:
    return [INPUT_NAME] if len(specs) == 1 else [s.name for s in specs]


def onnx_inputs(specs: Sequence[InputSpec]) -> list[dict]:
    """The exported graph's inputs: ONNX name, shape with a dynamic batch axis, dtype."""
    return [{"name": n, "shape": ["batch", *s.shape],
             "dtype": str(s.dtype).removeprefix("torch."),
             **({"high": s.high} if s.high is not None else {})}
            for n, s in zip(_names(specs), specs, strict=True)]


def task_metadata(task) -> dict[str, str]:
    """ONNX ``metadata_props`` for a model exported for ``task`` (a ``lighten.task.Task``), so
    the file alone says how to feed it: ``lighten.task`` (its ``describe()`` JSON),
    ``lighten.task.kind``, ``lighten.inputs`` (names, shapes, dtypes) and, for a language model,
    ``lighten.tokenizer`` (``char`` with its vocabulary, or ``bytes``)."""
    facts = task.describe()
    kind = facts.get("kind", task.kind)
    meta = {"lighten.task": json.dumps(facts, sort_keys=True),
            "lighten.task.kind": str(task.kind if kind == "python" else kind),
            "lighten.inputs": json.dumps(onnx_inputs(task.inputs))}
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer:
        meta["lighten.tokenizer"] = json.dumps(tokenizer, sort_keys=True)
    return meta


def preprocessing_metadata(facts: Mapping | None) -> dict[str, str]:
    """ONNX ``metadata_props`` for the data's preprocessing (``DataBundle.preprocessing()``):
    ``lighten.transform`` (how raw inputs become the model's input, e.g. ``x = (pixel / 255 -
    0.2860) / 0.3530``) and ``lighten.class_names`` (a JSON list; left out when unknown)."""
    facts = facts or {}
    meta = {}
    if facts.get("transform"):
        meta["lighten.transform"] = str(facts["transform"])
    if facts.get("class_names"):
        meta["lighten.class_names"] = json.dumps(list(facts["class_names"]))
    return meta


def _check_specs(input_shape, inputs) -> tuple[InputSpec, ...]:
    if inputs:
        specs = tuple(inputs)
        for s in specs:
            _check_shape(s.shape)
        if len({s.name for s in specs}) != len(specs):
            raise ExportError(f"input names {[s.name for s in specs]} must be distinct")
        return specs
    return (InputSpec(INPUT_NAME, _check_shape(input_shape), torch.float32),)


def _default_samples(specs: Sequence[InputSpec]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        if s.is_float:
            out.append(torch.randn(DEFAULT_SAMPLES, *s.shape, generator=g).to(s.dtype))
        else:
            out.append(torch.randint(0, s.high or 2, (DEFAULT_SAMPLES, *s.shape), generator=g,
                                     dtype=s.dtype))
    return tuple(out)


def _check_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ExportError(
            f"input_shape {input_shape!r} is invalid; pass the per-sample shape without batch, "
            "e.g. (1, 28, 28)"
        )
    return shape


def _torch_export(model: nn.Module, specs: Sequence[InputSpec], opset: int,
                  frozen: list[str] | None = None):
    """The TorchScript export of ``model`` as an ONNX proto. ``frozen`` (when given) receives
    the user's source lines where the trace froze Python control flow (a TracerWarning): the
    first suspects when the graph then computes something else than the model."""
    import onnx

    own = getattr(model, "onnx_graph", None)
    if callable(own):  # a model that writes its own deployed graph (early exit: If nodes)
        return own(specs, opset=opset)

    buf = io.BytesIO()
    example = tuple(torch.zeros(1, *s.shape, dtype=s.dtype) for s in specs)
    names = _names(specs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if frozen is not None:
                warnings.showwarning = _tracer_warning_recorder(frozen)
                warnings.simplefilter("always", torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                example,
                buf,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes={**{n: {0: "batch"} for n in names}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(
            f"cannot export {type(model).__name__} to ONNX (opset {opset}): {_one_line(exc)}; "
            "replace the unsupported operation or run `lighten check` to find the module"
        ) from exc
    return onnx.load_from_string(buf.getvalue())


def _tracer_warning_recorder(frozen: list[str]):
    """A ``warnings.showwarning`` that appends the user's line of each TracerWarning."""
    import inspect
    import linecache

    this_file = os.path.abspath(__file__)
    torch_dir = os.path.dirname(torch.__file__) + os.sep

    def record(message, category, *_):
        if not issubclass(category, torch.jit.TracerWarning):
            return
        frame = inspect.currentframe().f_back  # this function's own frame is in export.py
        while frame is not None:  # from the warning outward, to the first frame of the model
            path = os.path.abspath(frame.f_code.co_filename)
            if path == this_file:
                return  # reached the export itself: no model code on the way
            if not path.startswith(torch_dir) and os.path.basename(path) not in (
                    "warnings.py", "contextlib.py"):
                line = linecache.getline(path, frame.f_lineno).strip()
                where = f"{os.path.basename(path)}:{frame.f_lineno}" + (
                    f" (`{line}`)" if line else "")
                if where not in frozen:
                    frozen.append(where)
                return
            frame = frame.f_back

    return record


# ---------------------------------------------------------------- int8 weight folding


def fold_quantized_weights(proto) -> int:
    """Replace every QuantizeLinear whose inputs are all constants by an integer initializer.

    Mutates ``proto`` in place and returns how many nodes were folded. Unused float weights and
    Constant nodes are dropped afterwards so the file stores only the integer weights.
    """
    from onnx import numpy_helper

    graph = proto.graph
    consts = _constant_values(graph)
    folded = 0
    keep = []
    new_inits = []
    for node in graph.node:
        inputs = [name for name in node.input if name]  # "" marks an omitted optional input
        if node.op_type != "QuantizeLinear" or not all(name in consts for name in inputs):
            keep.append(node)
            continue
        x, scale = consts[inputs[0]], consts[inputs[1]]
        zero = consts[inputs[2]] if len(inputs) > 2 else np.zeros((), np.uint8)  # ONNX default
        if zero.dtype not in _FOLDABLE:
            keep.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = quantize_linear(x, scale, zero, axis=axis)
        new_inits.append(numpy_helper.from_array(q, name=node.output[0]))
        folded += 1
    if not folded:
        return 0
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    _drop_unused(graph)
    return folded


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, axis: int = 1):
    """ONNX QuantizeLinear in numpy: saturate(round_half_even(x / scale) + zero)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero)
    if zero.dtype not in _FOLDABLE:
        raise ExportError(f"QuantizeLinear zero point of dtype {zero.dtype} is not supported; "
                          "use int8 or uint8 zero points")
    if scale.ndim == 1 and x.ndim > 0:  # per-axis
        shape = [1] * x.ndim
        shape[axis % x.ndim] = scale.size
        scale = scale.reshape(shape)
        zero = zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    q = np.rint(x / scale) + zero.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zero.dtype)


def _constant_values(graph) -> dict[str, np.ndarray]:
    """Name -> value for every initializer and every Constant node output in the main graph."""
    from onnx import helper, numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name == "value":
            values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif attr.name in ("value_float", "value_floats"):
            values[node.output[0]] = np.asarray(helper.get_attribute_value(attr), np.float32)
        elif attr.name in ("value_int", "value_ints"):
            values[node.output[0]] = np.asarray(helper.get_attribute_value(attr), np.int64)
    return values


def _drop_unused(graph) -> None:
    """Remove initializers and Constant nodes that nothing reads any more."""
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    init_names = {i.name for i in graph.initializer}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(nodes)
    # a model input stays even if unused; only initializers listed as inputs may go
    graph_inputs = [i for i in graph.input if i.name in used or i.name not in init_names]
    del graph.input[:]
    graph.input.extend(graph_inputs)


# ---------------------------------------------------------------- verification


def _verify(model, data: bytes, sample_inputs, specs, *, quantized: bool, atol, top1: bool = True
            ) -> dict[int, tuple[float, float]]:
    """ORT against PyTorch on up to CHECK_BATCH samples, each alone (batch 1) and all together
    at batch CHECK_BATCH (fewer samples are repeated to fill it): batch-dependent kernels and
    per-batch dynamic quantization differ between the two. {batch: (max |diff|, agreement)}."""
    import onnxruntime as ort

    given = tuple(sample_inputs) if isinstance(sample_inputs, (tuple, list)) else (sample_inputs,)
    if len(given) != len(specs):
        raise ExportError(f"sample_inputs has {len(given)} input(s) but the model takes "
                          f"{len(specs)}; pass one batch per input")
    xs = []
    for s, t in zip(specs, given, strict=True):
        x = torch.as_tensor(t, dtype=s.dtype)
        if x.ndim < 2 and len(s.shape) > 0 or tuple(x.shape[1:]) != tuple(s.shape):
            raise ExportError(f"sample_inputs shape {tuple(x.shape)} does not match input_shape "
                              f"{tuple(s.shape)}; pass a batch of shape (N, *input_shape)")
        xs.append(x)
    count = min(CHECK_BATCH, min(len(x) for x in xs))
    if count < 1:
        raise ExportError("sample_inputs is empty; pass at least one sample per input")
    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the exported {type(model).__name__}: "
                          f"{_one_line(exc)}; report the op named above") from exc
    names = _names(specs)
    singles = [_compare(model, sess, names, [x[i:i + 1] for x in xs]) for i in range(count)]
    index = torch.arange(CHECK_BATCH) % count
    results = {1: tuple(np.concatenate(part) for part in zip(*singles, strict=True)),
               CHECK_BATCH: _compare(model, sess, names, [x[index] for x in xs])}
    return {batch: _judge(model, out, ref, batch, quantized=quantized, atol=atol, top1=top1)
            for batch, (out, ref) in results.items()}


def _compare(model, sess, names, xs) -> tuple[np.ndarray, np.ndarray]:
    """(ORT outputs, PyTorch outputs) of one batch."""
    with torch.no_grad():
        ref = model(*xs)
    if not isinstance(ref, torch.Tensor):
        raise ExportError(f"{type(model).__name__} returns {type(ref).__name__}, not a tensor; "
                          "export a model whose forward returns logits")
    ref = ref.detach().numpy()
    try:
        out = sess.run(None, {n: x.numpy() for n, x in zip(names, xs, strict=True)})[0]
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot run the exported {type(model).__name__}: "
                          f"{_one_line(exc)}; report the op named above") from exc
    return out, ref


def _judge(model, out: np.ndarray, ref: np.ndarray, batch: int, *, quantized: bool, atol,
           top1: bool = True) -> tuple[float, float]:
    if out.shape != ref.shape:
        raise ExportError(f"ONNX output shape {out.shape} differs from PyTorch {ref.shape}; "
                          "the model's forward depends on something the exporter cannot see")
    diff = float(np.max(np.abs(out - ref))) if ref.size else 0.0
    agree = float(np.mean(out.argmax(-1) == ref.argmax(-1))) if ref.ndim >= 1 and ref.size else 1.0
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    limit = atol if atol is not None else (QUANT_RTOL if quantized else FLOAT_RTOL) * scale
    min_agree = QUANT_MIN_AGREEMENT if quantized and top1 else 0.0
    if not np.isfinite(diff) or diff > limit or agree < min_agree:
        kind = "quantized" if quantized else "float"
        raise ExportError(
            f"ONNX export of {type(model).__name__} ({kind}) does not match PyTorch at batch "
            f"{batch}: "
            f"max_abs_diff={diff:.3g} (limit {limit:.3g}), top-1 agreement={agree:.3f} "
            f"(min {min_agree:.2f}); pass atol= to accept or check the unsupported op"
        )
    return diff, agree


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()
