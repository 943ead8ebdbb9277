"""Simplifications of an exported ONNX graph that runtimes do not make by themselves.

The TorchScript exporter writes ``x.view(b, g, c // g, h, w)`` with sizes read from
``x.size()`` as Shape -> Gather -> Div -> Unsqueeze -> Concat -> Reshape, and ``chunk`` as Slice
with ends computed from Shape. ONNX Runtime runs that arithmetic on every call, and its
optimizers cannot see through a computed Reshape (shape inference stops there).

* :func:`fold_shape_arithmetic` evaluates such integer subgraphs (only from Shape and
  constants) at two batch sizes. A value that does not change is a constant; a Reshape target
  whose entries change only with the batch becomes a constant with ``0`` (copy the batch axis)
  or ``-1`` there. Exact, float and int8 graphs.
* :func:`pad_depthwise_channels` (int8 graphs) gives a depthwise conv of 24 channels zero
  channels up to 32: ORT's int8 depthwise kernel runs 16 channels at a time and is twice as
  slow on the rest. Exact: the same int8 outputs.
* :func:`linear_as_gemm` (int8 graphs) writes an int8 Linear on a (B, T, K) input, exported as
  MatMul + Add(bias), as Reshape -> Gemm -> Reshape: ONNX Runtime then runs one QGemm with the
  int32 bias inside instead of MatMulIntegerToFloat, a bias DequantizeLinear and a float Add.
  Same integer sums; only the float rounding of the bias add may differ.
* :func:`pad_input_channels` (int8 graphs) gives a stride-1 conv on 1-3 quantized input
  channels (an image model's first conv) zero channels up to 4: ORT's int8 conv runs 1 channel
  1.4x and 3 channels 1.7x slower than 4. Exact: a pad channel holds the zero point, times
  zero weights.
* :func:`fold_shuffle_into_convs` (int8 graphs) removes a channel shuffle read only by convs
  (ShuffleNet's last unit of a stage): the convs take their input channels permuted instead
  (a depthwise conv its filters, and the shuffle moves past it). Exact.
* :func:`fuse_gelu` (int8 graphs) writes the erf GELU as one ``com.microsoft.Gelu``: ORT fuses
  it in float graphs but not between DequantizeLinear and QuantizeLinear. Same function; the
  kernel rounds floats differently (the one ORT's float graph uses).

Tried and dropped: a channel shuffle rewritten channels-last (so ORT cancels its NHWC/NCHW
transposes) leaves a 5-D uint8 Transpose that ORT runs 10x slower than the three it replaces.
A channel shuffle as one Gather of the channels (exact; ORT runs it on int8, 5% less kernel
time on the ShuffleNet-style model): OpenVINO 2026.4 computes ``Concat -> Gather(axis=1) -> 1x1
Conv`` wrongly (max |diff| 26 on 48 channels), so the file would not be portable.
:func:`simplify` applies the kept rewrites at export (:func:`lighten.export.export_onnx`).
"""

from __future__ import annotations

import numpy as np

# integer ops the shape evaluator computes (everything the exporter emits for x.size() math)
_SHAPE_OPS = {"Shape", "Constant", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Add",
              "Sub", "Mul", "Div", "Cast", "Identity", "Floor", "Ceil", "Neg", "Abs",
              "ReduceProd", "Equal", "Where", "Max", "Min"}
_BATCHES = (7, 13)  # two batch sizes no static dimension is likely to equal


def simplify(proto, *, quantized: bool) -> dict[str, int]:
    """Apply the exact rewrites to ``proto`` in place; returns how many of each were made.
    ``quantized``: the graph holds QuantizeLinear/DequantizeLinear (the shuffle rewrite pays
    only where int8 convs run channels-last)."""
    done = {"shape_values_folded": fold_shape_arithmetic(proto)}
    if quantized:
        done["shuffles_folded"] = fold_shuffle_into_convs(proto)  # before the padding
        done["depthwise_padded"] = pad_depthwise_channels(proto)
        done["input_channels_padded"] = pad_input_channels(proto)
        done["linears_as_gemm"] = linear_as_gemm(proto)  # before fuse_gelu: shapes infer
        done["gelu_fused"] = fuse_gelu(proto)
    return done


# ----------------------------------------------------------------------------- shape folding


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _infer(proto) -> dict[str, list]:
    """Tensor name -> dims (int, or a dim_param string, or None) after ONNX shape inference."""
    import onnx

    light = onnx.ModelProto()  # large initializers become typed inputs: inference needs no data
    if any(_large(i) for i in proto.graph.initializer):
        _light(proto, light)
    else:
        light.CopyFrom(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # inference is an optimization aid: no shapes, no folding
        return {}
    out = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else
                           (d.dim_param or None) for d in t.shape.dim]
    return out


def _large(init) -> bool:
    return int(np.prod(init.dims)) > 4096


def _light(proto, out) -> None:
    """``proto`` without the data of its large initializers (declared as inputs instead)."""
    from onnx import helper

    out.ir_version, out.producer_name = proto.ir_version, proto.producer_name
    out.opset_import.extend(proto.opset_import)
    g = out.graph
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    g.value_info.extend(proto.graph.value_info)
    declared = {i.name for i in proto.graph.input}
    for init in proto.graph.initializer:
        if not _large(init):
            g.initializer.append(init)
        elif init.name not in declared:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))


def _readers(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers


def _batch_symbol(proto) -> str | None:
    """The dim_param of the inputs' batch axis (the only dynamic axis lighten exports)."""
    init = {i.name for i in proto.graph.initializer}
    for v in proto.graph.input:
        if v.name in init:
            continue
        dims = v.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            return dims[0].dim_param
    return None


def _int_div(a, b):
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))


def _eval_node(node, ins: list):
    """One shape-arithmetic node in numpy, ONNX semantics (integer Div truncates)."""
    op = node.op_type
    if op == "Identity":
        return ins[0]
    if op == "Gather":
        return np.take(ins[0], ins[1], axis=_attr(node, "axis", 0))
    if op == "Unsqueeze":
        out = ins[0]
        axes = sorted(int(a) % (out.ndim + len(ins[1])) for a in np.ravel(ins[1]))
        for a in axes:
            out = np.expand_dims(out, a)
        return out
    if op == "Squeeze":
        if len(ins) < 2:
            return np.squeeze(ins[0])
        return np.squeeze(ins[0], axis=tuple(int(a) for a in np.ravel(ins[1])))
    if op == "Concat":
        return np.concatenate(ins, axis=_attr(node, "axis", 0))
    if op == "Slice":
        data, starts, ends = ins[0], ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), np.int64)
        index = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[int(a)] = slice(int(s), int(e), int(st))
        return data[tuple(index)]
    if op == "Cast":
        from onnx import helper

        return ins[0].astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
    if op == "Div":
        if np.issubdtype(ins[0].dtype, np.integer):
            return _int_div(ins[0], ins[1])
        return (ins[0] / ins[1]).astype(ins[0].dtype)
    if op == "ReduceProd":
        return np.prod(ins[0], keepdims=bool(_attr(node, "keepdims", 1))).astype(ins[0].dtype)
    simple = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Floor": np.floor,
              "Ceil": np.ceil, "Neg": np.negative, "Abs": np.abs, "Equal": np.equal,
              "Where": np.where, "Max": np.maximum, "Min": np.minimum}
    out = simple[op](*ins)
    return out.astype(ins[0].dtype) if op not in ("Equal", "Where") else out


def _shape_values(proto, shapes, symbol) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every tensor computable from Shape nodes and constants: its value at both batch sizes."""
    from lighten.export import _constant_values

    consts = _constant_values(proto.graph)
    values: dict[str, tuple] = {k: (v, v) for k, v in consts.items()
                                if v.dtype.kind in "iub" and v.size <= 64}
    for node in proto.graph.node:  # graph order is topological
        if node.op_type not in _SHAPE_OPS or node.op_type == "Constant":
            continue
        if node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is None or any(not isinstance(d, int) and d != symbol for d in dims):
                continue
            start, end = _attr(node, "start", 0), _attr(node, "end", None)
            pair = tuple(np.array([b if d == symbol else d for d in dims], np.int64)[start:end]
                         for b in _BATCHES)
        else:
            ins = [n for n in node.input]
            if not all(n == "" or n in values for n in ins):
                continue
            try:
                pair = tuple(_eval_node(node, [values[n][k] if n else None for n in ins])
                             for k in range(2))
            except Exception:  # anything unusual stays as the exporter wrote it
                continue
        values[node.output[0]] = pair
    return {k: v for k, v in values.items() if k not in consts}


def _reshape_target(v1, v2, in_dims, symbol, lenient=False):
    """A constant Reshape target equal to the computed one at every batch size, or None."""
    out = v1.astype(np.int64).copy()
    varying = [i for i in range(len(v1)) if v1[i] != v2[i]]
    if (v1 == 0).any():  # a literal 0 means "copy" only with allowzero=0; leave such shapes
        return None
    rest = []
    for i in varying:
        if (i < len(in_dims) and in_dims[i] == symbol and v1[i] == _BATCHES[0]
                and v2[i] == _BATCHES[1]):
            out[i] = 0  # copy the batch axis from the input
        else:
            rest.append(i)
    known = lenient or all(isinstance(d, int) or d == symbol for d in in_dims)
    if len(rest) > 1 or (rest and ((out == -1).any() or not known)):
        return None  # (an input of unknown shape may be known after the next pass)
    for i in rest:
        out[i] = -1  # the one size left is implied by the element count
    return out


def fold_shape_arithmetic(proto, *, max_passes: int = 64) -> int:
    """Replace integer values computed from Shape (Reshape targets, Slice bounds, ...) by
    constants, in place; returns how many node inputs now read a constant. Repeats until
    nothing changes, since a folded Reshape lets shape inference see past it."""
    total = 0
    if not any(n.op_type == "Shape" for n in proto.graph.node):
        return 0
    lenient = False  # first only folds that keep the batch symbol; then -1 where it is lost
    for _ in range(max_passes):
        changed = _fold_once(proto, lenient)
        if not changed and lenient:
            break
        lenient = not changed
        total += changed
    if total:
        _drop_dead(proto.graph)
    return total


def _fold_once(proto, lenient: bool = False) -> int:
    from onnx import numpy_helper

    symbol = _batch_symbol(proto)
    shapes = _infer(proto)
    if symbol is None or not shapes:
        return 0
    values = _shape_values(proto, shapes, symbol)
    new_inits, folded = [], 0
    names: dict[bytes, str] = {}

    def constant(arr) -> str:
        key = arr.dtype.str.encode() + arr.tobytes() + str(arr.shape).encode()
        if key not in names:
            names[key] = f"lighten_shape_{len(proto.graph.initializer) + len(new_inits)}"
            new_inits.append(numpy_helper.from_array(arr, names[key]))
        return names[key]

    for node in proto.graph.node:
        if node.output and node.output[0] in values:  # the arithmetic itself: dropped later
            continue
        for k, name in enumerate(node.input):
            if name not in values:
                continue
            v1, v2 = values[name]
            if np.array_equal(v1, v2) and v1.dtype == v2.dtype:
                node.input[k] = constant(np.asarray(v1))
                folded += 1
            elif node.op_type == "Reshape" and k == 1 and v1.ndim == 1 and v1.shape == v2.shape:
                in_dims = shapes.get(node.input[0])
                target = (_reshape_target(v1, v2, in_dims, symbol, lenient) if in_dims
                          else None)
                if target is not None and _attr(node, "allowzero", 0) == 0:
                    node.input[k] = constant(target)
                    folded += 1
    proto.graph.initializer.extend(new_inits)
    return folded


def _used(graph) -> set[str]:
    """Every tensor name a node reads, inside If/Loop bodies too (they read outer names)."""
    from onnx import AttributeProto

    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                names |= _used(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    names |= _used(sub)
    return names


def _drop_dead(graph) -> None:
    """Remove nodes (and initializers) whose outputs nothing reads; the graph outputs stay."""
    while True:
        used = _used(graph)
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = _used(graph)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


# ----------------------------------------------------------------------------- depthwise padding

DEPTHWISE_MULTIPLE = 16  # ORT's int8 depthwise kernel vectorizes 16 channels at a time
# ops that map a zero channel to a zero channel, one value at a time (Q/DQ: 0 <-> zero point)
_ZERO_KEEPING = {"Relu", "Clip", "LeakyRelu", "QuantizeLinear", "DequantizeLinear", "Identity"}


class _Consts:
    """Constant tensors of a graph (initializers, Constant nodes, and Identity / Round / Cast of
    them, as the exporter leaves biases), materialized as initializers on demand."""

    def __init__(self, graph):
        from lighten.export import _constant_values

        self.graph = graph
        self.values = _constant_values(graph)
        self.producer = {o: n for n in graph.node for o in n.output}

    def get(self, name: str):
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is None or node.op_type not in ("Identity", "Round", "Cast") or not node.input:
            return None
        x = self.get(node.input[0])
        if x is None:
            return None
        if node.op_type == "Round":
            x = np.rint(x)
        elif node.op_type == "Cast":
            from onnx import helper

            x = x.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
        self.values[name] = x
        return x

    def add(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = f"{name}_{len(self.graph.initializer)}"  # shared tensors are padded once each
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.values[name] = value
        return name


def _padded(x: np.ndarray, axis: int, size: int, fill) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths, constant_values=np.asarray(fill, x.dtype))


class _ConvParams:
    """A Conv's weight or bias input: a constant, or DequantizeLinear of constants (int8)."""

    def __init__(self, consts: _Consts, readers, name: str):
        self.consts, self.name, self.dq = consts, name, None
        node = consts.producer.get(name)
        if consts.get(name) is not None and (node is None or node.op_type != "DequantizeLinear"):
            self.value = consts.get(name)
        elif (node is not None and node.op_type == "DequantizeLinear"
              and len(readers.get(name, [])) == 1
              and all(consts.get(i) is not None for i in node.input if i)):
            self.dq = node
            self.value = consts.get(node.input[0])
        else:
            self.value = None

    def take(self, axis: int, order: np.ndarray, tag: str) -> str:
        """The tensor with its entries along ``axis`` reordered (per-channel scales too)."""
        c = self.consts
        if self.dq is None:
            return c.add(f"{self.name}__{tag}", np.take(self.value, order, axis=axis))
        q_axis = _attr(self.dq, "axis", 1) % max(self.value.ndim, 1)
        for k, name in enumerate(self.dq.input):
            v = c.get(name) if name else None
            if v is None or (k > 0 and (v.size == 1 or axis != q_axis)):
                continue
            self.dq.input[k] = c.add(f"{name}__{tag}", np.take(v, order, axis=0 if k else axis))
        return self.name

    def pad(self, axis: int, size: int, tag: str) -> str:
        """The tensor padded with zeros along ``axis`` (per-channel scales with ones)."""
        c = self.consts
        if self.dq is None:
            return c.add(f"{self.name}__{tag}", _padded(self.value, axis, size, 0))
        q_axis = _attr(self.dq, "axis", 1) % max(self.value.ndim, 1)
        for k, name in enumerate(self.dq.input):
            v = c.get(name) if name else None
            if v is None:
                continue
            if k == 0:
                v = _padded(v, axis, size, 0)
            elif v.size > 1 and axis == q_axis and k == 1:  # per-channel scale: repeat the
                v = np.pad(v, (0, size - v.size), mode="edge")  # last (bias = x * w scales)
            elif v.size > 1 and axis == q_axis:  # per-channel zero point
                v = _padded(v, 0, size, 0)
            else:
                continue
            self.dq.input[k] = c.add(f"{name}__{tag}", v)
        return self.name


def pad_depthwise_channels(proto, multiple: int = DEPTHWISE_MULTIPLE) -> int:
    """Give each int8 depthwise Conv whose channel count is not a multiple of ``multiple`` zero
    channels up to one, in place; returns how many depthwise convs were padded.

    ONNX Runtime's int8 depthwise kernel runs 24 channels twice as slowly as 32. The channels
    are padded where they are made: the Conv producing the depthwise input gets zero filters
    (zero bias), the depthwise conv zero filters, and every Conv reading the padded tensors
    zero weights for the new input channels. Between them only ops that keep a zero a zero
    (ReLU, Clip, Q/DQ with per-tensor parameters) are allowed; anything else reading the
    region (concat, add, reshape, a graph output) leaves it as it is. Exact: a pad channel
    holds 0 (its zero point in int8), and multiplies only zero weights."""
    graph = proto.graph
    consts = _Consts(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    padded_convs: set[int] = set()
    count = 0
    for node in list(graph.node):
        if node.op_type != "Conv" or id(node) in padded_convs:
            continue
        w = _ConvParams(consts, readers, node.input[1])
        group = _attr(node, "group", 1)
        if w.value is None or w.dq is None or w.value.ndim < 3:
            continue
        c = w.value.shape[0]
        if not (group == c > 1 and w.value.shape[1] == 1 and c % multiple):
            continue
        region = _padding_region(node, consts, readers, outputs)
        if region is None:
            continue
        size = -(-c // multiple) * multiple
        if _pad_region(region, c, size, consts, readers):
            padded_convs.update(id(n) for n in region["depthwise"])
            count += len(region["depthwise"])
    if count:
        del graph.value_info[:]  # channel counts changed: let the runtime infer shapes again
        _drop_dead(graph)
    return count


def _padding_region(dw, consts, readers, outputs):
    """The convs around depthwise ``dw`` whose channels grow together, or None."""
    producer = consts.producer
    # back from the depthwise input to the Conv that makes those channels
    name = dw.input[0]
    while True:
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "Conv":
            root = node
            break
        if node.op_type not in _ZERO_KEEPING or not _zero_keeping(node, consts):
            return None
        name = node.input[0]
    c = _ConvParams(consts, readers, dw.input[1]).value.shape[0]
    region = {"root": root, "depthwise": [], "inputs": [], "tensors": set()}
    todo = [root.output[0]]
    while todo:
        t = todo.pop()
        if t in region["tensors"]:
            continue
        region["tensors"].add(t)
        if t in outputs or not readers.get(t):
            return None
        for r in readers[t]:
            if r.op_type in _ZERO_KEEPING and r.input[0] == t and _zero_keeping(r, consts):
                todo.append(r.output[0])
                continue
            if r.op_type != "Conv" or r.input[0] != t:
                return None
            w = _ConvParams(consts, readers, r.input[1])
            b = _ConvParams(consts, readers, r.input[2]) if len(r.input) > 2 and r.input[2] \
                else None
            if w.value is None or (b is not None and b.value is None) or w.value.ndim < 3:
                return None
            group = _attr(r, "group", 1)
            if group == 1 and w.value.shape[1] == c:
                region["inputs"].append(r)
            elif group == c == w.value.shape[0] and w.value.shape[1] == 1:
                if r not in region["depthwise"]:
                    region["depthwise"].append(r)
                    todo.append(r.output[0])
            else:
                return None
    root_w = _ConvParams(consts, readers, root.input[1])
    root_b = _ConvParams(consts, readers, root.input[2]) if len(root.input) > 2 and \
        root.input[2] else None
    if (root_w.value is None or root_w.value.shape[0] != c or _attr(root, "group", 1) != 1
            or (root_b is not None and root_b.value is None) or not region["depthwise"]):
        return None
    return region


def _zero_keeping(node, consts) -> bool:
    """Whether ``node`` maps 0 to 0 channel by channel (its parameters are per-tensor)."""
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        params = [consts.get(i) for i in node.input[1:] if i]
        return all(p is not None and p.size == 1 for p in params)
    if node.op_type == "Clip":
        bounds = [consts.get(i) for i in node.input[1:] if i]
        if any(b is None for b in bounds):
            return False
        lo = float(bounds[0]) if bounds else -np.inf
        hi = float(bounds[1]) if len(bounds) > 1 else np.inf
        return lo <= 0 <= hi
    return True


def _pad_region(region, c, size, consts, readers) -> bool:
    tag = f"pad{size}"
    for conv in [region["root"], *region["depthwise"]]:  # more output channels
        for k in (1, 2):
            if len(conv.input) > k and conv.input[k]:
                conv.input[k] = _ConvParams(consts, readers, conv.input[k]).pad(0, size, tag)
    for conv in region["depthwise"]:
        for a in conv.attribute:
            if a.name == "group":
                a.i = size
    for conv in region["inputs"]:  # more input channels, with zero weights
        p = _ConvParams(consts, readers, conv.input[1])
        conv.input[1] = p.pad(1, size, tag)
    return True


INPUT_MULTIPLE = 4  # ORT's int8 conv (NHWC) packs input channels in fours


def pad_input_channels(proto, multiple: int = INPUT_MULTIPLE) -> int:
    """Give each int8 Conv (group 1, stride 1) that reads fewer than ``multiple`` channels
    straight from a QuantizeLinear zero channels up to ``multiple``, in place; returns how many.
    The int8 input gets a Pad with its zero point (a new DequantizeLinear reads it), the weights
    zero input channels. Measured (ORT 1.32, batch 64, 28x28, 32 filters of 3x3, 1 thread):
    1 channel 0.87 ms, padded to 4 0.61 ms + 0.06 ms for the Pad and its wider NHWC transpose;
    3 channels 1.0 ms, padded 0.63 ms. A strided conv (a 4x4/4 patch embedding: 0.14 -> 0.13 ms)
    saves less than the Pad costs, so only stride 1 is padded."""
    from onnx import helper

    graph = proto.graph
    consts = _Consts(graph)
    readers = _readers(graph)
    new_nodes: dict[int, list] = {}
    for conv in graph.node:
        if (conv.op_type != "Conv" or _attr(conv, "group", 1) != 1 or len(conv.input) < 2
                or any(s != 1 for s in _attr(conv, "strides", []))):
            continue
        dq = consts.producer.get(conv.input[0])
        q = consts.producer.get(dq.input[0]) if dq is not None and dq.input else None
        w = _ConvParams(consts, readers, conv.input[1])
        if (dq is None or dq.op_type != "DequantizeLinear" or q is None
                or q.op_type != "QuantizeLinear" or _grid(dq, consts) is None
                or w.value is None or w.dq is None or w.value.ndim < 3
                or not 0 < w.value.shape[1] < multiple):
            continue
        zp = consts.get(dq.input[2])
        rank = w.value.ndim
        pads = np.zeros(2 * rank, np.int64)
        pads[rank + 1] = multiple - w.value.shape[1]  # the end of the channel axis
        base = conv.name or conv.output[0]
        pads_name = consts.add(f"{base}_inpads", pads)
        fill = consts.add(f"{base}_infill", zp.reshape(()))
        new_nodes[id(conv)] = [
            helper.make_node("Pad", [dq.input[0], pads_name, fill], [f"{base}_in_q"],
                             name=f"{base}_inpad"),
            helper.make_node("DequantizeLinear", [f"{base}_in_q", *dq.input[1:]],
                             [f"{base}_in"], name=f"{base}_in_dq")]
        conv.input[0] = f"{base}_in"
        conv.input[1] = w.pad(1, multiple, f"in{multiple}")
    if not new_nodes:
        return 0
    nodes = []
    for n in graph.node:
        nodes += [*new_nodes.get(id(n), []), n]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # channel counts changed
    _drop_dead(graph)
    return len(new_nodes)


# ----------------------------------------------------------------------------- GELU

_SQRT2 = float(np.sqrt(np.float32(2.0)))


def fuse_gelu(proto) -> int:
    """Replace the exporter's erf GELU, ``x / sqrt(2) -> Erf -> + 1 -> * x -> * 0.5``, by one
    ``com.microsoft.Gelu`` node (ONNX Runtime and OpenVINO both run it), in place; returns how
    many. ORT fuses the pattern itself in a float graph, but in a QDQ graph it first gives each
    reader of a dequantized tensor its own DequantizeLinear, so ``x`` is two tensors and the
    five ops run one by one. Same function; only the float rounding of the kernel differs
    (the kernel ORT uses for the float graph)."""
    from onnx import helper

    graph = proto.graph
    consts = _Consts(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}

    def scalar(name):
        v = consts.get(name)
        return float(v.reshape(())) if v is not None and v.size == 1 else None

    def other(node, name):  # the input of a binary node that is not ``name``
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    def single(name, op):
        users = readers.get(name, [])
        if len(users) == 1 and users[0].op_type == op and name not in outputs:
            return users[0]
        return None

    replace: dict[int, object] = {}
    dead: set[int] = set()
    for div in graph.node:
        if div.op_type != "Div" or len(div.input) != 2:
            continue
        x, c = div.input
        c_val = scalar(c)
        if c_val is None or abs(c_val - _SQRT2) > 1e-5:
            continue
        erf = single(div.output[0], "Erf")
        if erf is None:
            continue
        add = single(erf.output[0], "Add")
        if add is None or scalar(other(add, erf.output[0]) or "") != 1.0:
            continue
        mul = single(add.output[0], "Mul")
        if mul is None or other(mul, add.output[0]) != x:
            continue
        half = single(mul.output[0], "Mul")
        if half is None or scalar(other(half, mul.output[0]) or "") != 0.5:
            continue
        gelu = helper.make_node("Gelu", [x], [half.output[0]], domain="com.microsoft",
                                name=f"{div.name or x}_gelu")
        replace[id(div)] = gelu
        dead.update(id(n) for n in (erf, add, mul, half))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_dead(graph)
    return len(replace)


# ----------------------------------------------------------------------------- Linear as Gemm


def linear_as_gemm(proto) -> int:
    """Rewrite each int8 ``MatMul(DQ(x), Transpose(DQ(W))) [+ bias]`` whose ``x`` is (B, ..., K)
    with static sizes after the batch as ``Reshape(x_q, (-1, K)) -> DQ -> Gemm(transB=1, bias)
    -> Reshape((-1, ..., N))``, in place; returns how many. ONNX Runtime fuses a Gemm with
    DequantizeLinear inputs (int32 bias included) into one QGemm, but a 3-D MatMul becomes
    MatMulIntegerToFloat followed by a DequantizeLinear of the bias and a float Add. The
    reshapes run on the int8 tensor (no copy in ORT). Same integer products and sums."""
    from onnx import helper

    graph = proto.graph
    consts = _Consts(graph)
    readers = _readers(graph)
    shapes = _infer(proto)
    outputs = {o.name for o in graph.output}
    symbol = _batch_symbol(proto)
    replace: dict[int, list] = {}
    dead: set[int] = set()
    for mm in graph.node:
        if mm.op_type != "MatMul" or len(mm.input) != 2:
            continue
        rewrite = _gemm_parts(mm, consts, readers, shapes, symbol, outputs)
        if rewrite is None:
            continue
        a_dq, w_dq, dims, bias, add = rewrite
        n_out = consts.get(w_dq.input[0]).shape[0]
        base = mm.name or mm.output[0]
        flat = consts.add(f"{base}_2d", np.array([-1, dims[-1]], np.int64))
        back = consts.add(f"{base}_nd", np.array([-1, *dims[1:-1], n_out], np.int64))
        out = add.output[0] if add is not None else mm.output[0]
        replace[id(mm)] = [
            helper.make_node("Reshape", [a_dq.input[0], flat], [f"{base}_x2d_q"],
                             name=f"{base}_flatten"),
            helper.make_node("DequantizeLinear", [f"{base}_x2d_q", *a_dq.input[1:]],
                             [f"{base}_x2d"], name=f"{base}_x2d_dq"),
            helper.make_node("Gemm", [f"{base}_x2d", w_dq.output[0], *([bias] if bias else [])],
                             [f"{base}_y2d"], name=f"{base}_gemm", transB=1),
            helper.make_node("Reshape", [f"{base}_y2d", back], [out], name=f"{base}_unflatten")]
        if add is not None:
            dead.add(id(add))
    if not replace:
        return 0
    nodes = []
    for n in graph.node:
        if id(n) not in dead:
            nodes += replace.get(id(n), [n])
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_dead(graph)
    return len(replace)


def _gemm_parts(mm, consts, readers, shapes, symbol, outputs):
    """(x's DequantizeLinear, W's DequantizeLinear, x's dims, bias name or None, bias Add or
    None) of a MatMul that :func:`linear_as_gemm` can rewrite, or None."""
    producer = consts.producer
    a_dq, trans = producer.get(mm.input[0]), producer.get(mm.input[1])
    if (a_dq is None or a_dq.op_type != "DequantizeLinear" or trans is None
            or trans.op_type != "Transpose" or list(_attr(trans, "perm", [])) != [1, 0]):
        return None
    w_dq = producer.get(trans.input[0])
    if w_dq is None or w_dq.op_type != "DequantizeLinear":
        return None
    w = consts.get(w_dq.input[0])
    params = [consts.get(i) for i in a_dq.input[1:] if i]
    if (w is None or w.ndim != 2 or any(p is None or p.size != 1 for p in params)
            or any(consts.get(i) is None for i in w_dq.input[1:] if i)):
        return None  # a per-tensor activation, a constant 2-D weight
    if _attr(w_dq, "axis", 1) % 2 != 0 and consts.get(w_dq.input[1]).size > 1:
        return None  # per-channel scales must follow the output channels (W's rows)
    dims = shapes.get(mm.input[0])
    if (not dims or len(dims) < 3 or dims[-1] != w.shape[1]
            or not all(isinstance(d, int) for d in dims[1:])
            or not (dims[0] in (symbol, None) or isinstance(dims[0], int))):
        return None  # (B, ..., K) with static sizes after the batch
    users = readers.get(mm.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and mm.output[0] not in outputs:
        bias = [i for i in users[0].input if i != mm.output[0]]
        if len(bias) == 1 and _is_bias(bias[0], consts, w.shape[0]):
            return a_dq, w_dq, dims, bias[0], users[0]
    return a_dq, w_dq, dims, None, None


def _is_bias(name: str, consts, n_out: int) -> bool:
    """A constant of N values (or the DequantizeLinear of one: an int32 bias)."""
    value = consts.get(name)
    if value is None:
        node = consts.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        value = consts.get(node.input[0])
        if value is None or any(consts.get(i) is None for i in node.input[1:] if i):
            return False
    return value.shape == (n_out,)


# ----------------------------------------------------------------------------- channel shuffle


def fold_shuffle_into_convs(proto) -> int:
    """Remove each channel shuffle ``Reshape(x, (B, g, C/g, ...)) -> Transpose(0, 2, 1, ...) ->
    Reshape(., (B, C, ...))`` whose result only convs read, in place; returns how many. A conv
    of shuffled channels is the conv with its input channels permuted; a depthwise conv of them
    is the depthwise conv with its filters permuted, followed by the same shuffle, which moves
    on to its readers in turn. Quantize/dequantize (per-tensor) and ReLU between commute with
    the shuffle. In an int8 graph ONNX Runtime runs each shuffle as three transposes (two of
    them NHWC/NCHW conversions) and two reshapes; after the fold nothing moves. Exact: the
    same products, summed in another order (integers: the same sums)."""
    graph = proto.graph
    consts = _Consts(graph)
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    shapes = _infer(proto)
    count = 0
    for r1 in list(graph.node):
        if r1.op_type != "Reshape":
            continue
        found = _shuffle_parts(r1, consts, readers, outputs, shapes)
        if found is None:
            continue
        r2, channels, groups = found
        convs: list = []
        if not _conv_readers(r2.output[0], channels, consts, readers, outputs, convs):
            continue
        perm = np.arange(channels).reshape(groups, channels // groups).T.reshape(-1)
        inverse = np.argsort(perm)  # shuffled[c] = x[perm[c]], so conv(shuffled) = conv'(x)
        tag = f"perm{count}"
        for conv, axis in convs:  # axis 1: input channels; 0: a depthwise conv's filters
            conv.input[1] = _ConvParams(consts, readers, conv.input[1]).take(axis, inverse, tag)
            if axis == 0 and len(conv.input) > 2 and conv.input[2]:  # and its bias
                conv.input[2] = _ConvParams(consts, readers, conv.input[2]).take(0, inverse, tag)
        for node in readers.get(r2.output[0], []):
            for k, name in enumerate(node.input):
                if name == r2.output[0]:
                    node.input[k] = r1.input[0]
        readers = _readers(graph)
        count += 1
    if count:
        _drop_dead(graph)
    return count


def _conv_readers(name, channels, consts, readers, outputs, found, depth=0) -> bool:
    """Collect (conv, axis to permute) for every conv reading ``name`` through per-tensor Q/DQ
    and ReLU; False when anything else reads it (or a depthwise conv's result)."""
    users = readers.get(name, [])
    if name in outputs or not users or depth > 16:
        return False
    for u in users:
        if u.op_type in _ZERO_KEEPING and u.input[0] == name and _zero_keeping(u, consts):
            if not _conv_readers(u.output[0], channels, consts, readers, outputs, found,
                                 depth + 1):
                return False
            continue
        if u.op_type != "Conv" or u.input[0] != name or name in u.input[1:]:
            return False
        w = _ConvParams(consts, readers, u.input[1])
        b = _ConvParams(consts, readers, u.input[2]) if len(u.input) > 2 and u.input[2] \
            else None
        if w.value is None or w.value.ndim < 3 or (b is not None and b.value is None):
            return False
        group = _attr(u, "group", 1)
        if group == 1 and w.value.shape[1] == channels:
            found.append((u, 1))
        elif group == channels == w.value.shape[0] and w.value.shape[1] == 1:
            found.append((u, 0))  # the shuffle moves on past it
            if not _conv_readers(u.output[0], channels, consts, readers, outputs, found,
                                 depth + 1):
                return False
        else:
            return False
    return True


def _shuffle_parts(r1, consts, readers, outputs, shapes):
    """(the closing Reshape, channels, groups) when ``r1`` opens a channel shuffle, or None."""
    dims = shapes.get(r1.input[0])
    target = consts.get(r1.input[1])
    if (not dims or len(dims) < 3 or not all(isinstance(d, int) for d in dims[1:])
            or target is None or target.ndim != 1 or len(target) != len(dims) + 1
            or _attr(r1, "allowzero", 0)):
        return None
    channels, groups = dims[1], int(target[1])
    if (groups < 2 or groups * int(target[2]) != channels or list(target[3:]) != dims[2:]
            or (int(target[0]) not in (0, -1) and target[0] != dims[0])):
        return None
    grid = _grid(consts.producer.get(r1.input[0]), consts)
    trans = _sole_reader(r1.output[0], readers, outputs, grid, consts)
    perm = list(range(len(target)))
    perm[1], perm[2] = 2, 1
    if trans is None or trans.op_type != "Transpose" or list(_attr(trans, "perm", [])) != perm:
        return None
    r2 = _sole_reader(trans.output[0], readers, outputs, grid, consts)
    if r2 is None or r2.op_type != "Reshape" or _attr(r2, "allowzero", 0):
        return None
    back = consts.get(r2.input[1])
    if (back is None or len(back) != len(dims) or int(back[1]) != channels
            or list(back[2:]) != dims[2:]
            or (int(back[0]) not in (0, -1) and back[0] != dims[0])):
        return None
    return r2, channels, groups


def _grid(node, consts, op: str = "DequantizeLinear"):
    """(scale, zero point) of a per-tensor ``op`` node with constant parameters, or None."""
    if node is None or node.op_type != op or len(node.input) < 3:
        return None
    params = [consts.get(i) for i in node.input[1:3]]
    if any(p is None or p.size != 1 for p in params):
        return None
    return tuple(p.reshape(()).item() for p in params)


def _sole_reader(name, readers, outputs, grid, consts):
    """The one node reading ``name``, past a QuantizeLinear -> DequantizeLinear pair on
    ``grid`` (exact: the values are on it already); None if several read it."""
    while True:
        users = readers.get(name, [])
        if name in outputs or len(users) != 1:
            return None
        node = users[0]
        if node.op_type != "QuantizeLinear":
            return node
        dq = readers.get(node.output[0], [])
        if (grid is None or node.output[0] in outputs or len(dq) != 1
                or _grid(node, consts, "QuantizeLinear") != grid
                or _grid(dq[0], consts) != grid):
            return None
        name = dq[0].output[0]
