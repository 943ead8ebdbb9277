"""Exact QDQ completion of an exported graph, so integer kernels chain through concats, channel
shuffles, pools and gates instead of dequantizing to float between them.

ONNX Runtime fuses ``DequantizeLinear -> op -> QuantizeLinear`` into an integer kernel
(QLinearConcat, QLinearAdd, QLinearMul, QLinearSigmoid, QLinearGlobalAveragePool,
QLinearAveragePool; Reshape / Transpose / MaxPool run on int8 between a DQ and a Q with equal
parameters) only when *every* reader of the op's result is a QuantizeLinear. The TorchScript
export of a fake-quantized model often leaves that last quantizer out although the value is
already on an int8 grid:

* a Concat (or Split, Reshape, Transpose, ...) of tensors dequantized with one scale and zero
  point yields values exactly on that grid (quant.ptq gives the tensors that meet at a concat
  one shared grid, :attr:`lighten.quant.plan.QuantPlan.groups`), but it is read by the next
  concat as a float tensor;
* a pool or sigmoid whose result reaches only QuantizeLinear nodes of one grid through
  reshapes/flattens is quantized after the reshape, where ORT does not look.

:func:`complete_qdq` inserts ``QuantizeLinear -> DequantizeLinear`` with those parameters right
after such an op. Both insertions are exact: quantizing a value that is already on the grid
returns its own code, and quantizing before a reshape equals quantizing after it. So the graph
computes the same numbers, and ONNX Runtime (and OpenVINO, which reads the same QDQ form) now
fuses the op into its integer kernel.
"""

from __future__ import annotations

import numpy as np

MOVE_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity",
            "Slice", "Split", "Expand", "Gather"}  # (Gather: its data input, input 0)
# ops ORT runs on int8 when DequantizeLinear feeds them and QuantizeLinear reads them
FUSABLE_OPS = {"Concat", "Add", "Mul", "Sigmoid", "GlobalAveragePool", "AveragePool"}


def complete_qdq(proto) -> int:
    """Insert exact Q->DQ pairs after ops whose output is on a known int8 grid, and let Shape
    nodes read int8 tensors instead of dequantized ones; mutates ``proto`` in place and returns
    how many edits it made."""
    from onnx import helper, numpy_helper

    from lighten.export import _constant_values

    graph = proto.graph
    consts = _constant_values(graph)
    for node in graph.node:  # the exporter's constant folding leaves Identity(constant) nodes
        if node.op_type == "Identity" and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}

    def params(node):  # (scale, zero point) of a per-tensor Q/DQ with constant parameters
        if len(node.input) < 3 or node.input[1] not in consts or node.input[2] not in consts:
            return None
        scale, zp = consts[node.input[1]], consts[node.input[2]]
        if scale.size != 1 or zp.size != 1:
            return None
        return float(scale.reshape(())), int(zp.reshape(())), zp.dtype.str

    grids: dict[str, tuple | None] = {}

    def grid(name: str):  # the grid a tensor's values lie on exactly, if known
        if name in grids:
            return grids[name]
        grids[name] = None  # cycles cannot happen in ONNX, but keep lookups finite
        node = producer.get(name)
        g = None
        if node is None:
            g = None
        elif node.op_type == "DequantizeLinear":
            g = params(node)
        elif node.op_type in MOVE_OPS and node.input:
            g = grid(node.input[0])
        elif node.op_type == "Concat":
            gs = [grid(i) for i in node.input]
            g = gs[0] if gs and gs[0] is not None and all(x == gs[0] for x in gs) else None
        grids[name] = g
        return g

    def downstream(name: str, depth: int = 0):  # the grid every reader quantizes to, if one
        users = readers.get(name, [])
        if not users or name in outputs or depth > 8:
            return None
        found = set()
        for u in users:
            if u.op_type == "QuantizeLinear" and u.input[0] == name:
                p = params(u)
            elif u.op_type in MOVE_OPS and u.input[0] == name and u.op_type != "Split":
                p = downstream(u.output[0], depth + 1)
            else:
                p = None
            if p is None:
                return None
            found.add(p)
        return found.pop() if len(found) == 1 else None

    inserts: dict[str, tuple] = {}  # tensor -> grid to quantize it to
    for node in graph.node:
        if node.op_type in MOVE_OPS or node.op_type == "Concat":
            for out in node.output:
                g = grid(out)
                users = readers.get(out, [])
                # a compute reader (Conv, Gemm, ...) takes the DQ through a move by itself in
                # ORT; another data op or a fusable op needs the int8 value re-marked
                data_reader = node.op_type == "Concat" or any(
                    u.op_type in MOVE_OPS or u.op_type in FUSABLE_OPS for u in users)
                if (g is not None and out not in outputs and data_reader
                        and not _all_quantized(users, out, g, params)):
                    inserts[out] = g
        if node.op_type in FUSABLE_OPS and node.output[0] not in inserts:
            out = node.output[0]
            users = readers.get(out, [])
            if users and not all(u.op_type == "QuantizeLinear" for u in users):
                g = downstream(out)
                if g is not None:
                    inserts[out] = g
    reshaped = 0
    for node in graph.node:  # a shape needs no values: read it off the int8 tensor
        src = producer.get(node.input[0]) if node.op_type == "Shape" and node.input else None
        if src is not None and src.op_type == "DequantizeLinear":
            node.input[0] = src.input[0]
            reshaped += 1
    if not inserts:
        return reshaped

    new_nodes, new_inits = [], []
    for node in graph.node:
        new_nodes.append(node)
        for out in node.output:
            if out not in inserts:
                continue
            scale, zp, dtype = inserts[out]
            base = f"{out}__qdq"
            new_inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{base}_scale"),
                          numpy_helper.from_array(np.array(zp, np.dtype(dtype)), f"{base}_zp")]
            for u in readers.get(out, []):
                for k, name in enumerate(u.input):
                    if name == out:
                        u.input[k] = f"{base}_dq"
            new_nodes += [
                helper.make_node("QuantizeLinear", [out, f"{base}_scale", f"{base}_zp"],
                                 [f"{base}_q"], name=f"{base}_Q"),
                helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"],
                                 [f"{base}_dq"], name=f"{base}_DQ")]
    for node in new_nodes:  # shapes of the new DQ outputs, too
        if node.op_type == "Shape" and node.input[0].endswith("__qdq_dq"):
            node.input[0] = node.input[0][:-len("_dq")] + "_q"
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return len(inserts) + reshaped


def _all_quantized(users, name, g, params) -> bool:
    return bool(users) and all(u.op_type == "QuantizeLinear" and u.input[0] == name
                               and params(u) == g for u in users)
