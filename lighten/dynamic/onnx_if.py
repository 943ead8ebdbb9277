"""An early-exit model as ONE ONNX graph whose ``If`` nodes skip the later segments.

Built from the per-segment files of :func:`lighten.dynamic.runtime.export_segments`: segment 0
runs in the main graph; after exit k the graph computes ``m_k`` (per row, the best
``confidence - threshold`` so far: the row has answered where it is >= 0) and ``out_k`` (each
row's answer so far), then ``If(min(m_k) >= 0)`` returns ``out_k`` or runs the next segment
inside the ``else`` branch. So at batch 1 a confident sample executes none of the later
segments' nodes, and a batch stops as soon as every row has answered; rows that answered early
keep their early logits (the same per-sample semantics as the PyTorch model and the segment
loop).

This is the deployed form of ``dynamic.early_exit`` (why, measured against the per-segment loop:
:mod:`lighten.dynamic.runtime`). Each segment's weights live in the branch that runs it.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def _renamed(graph: onnx.GraphProto, prefix: str, input_name: str):
    """(nodes, initializers, outputs) of ``graph`` with every value name prefixed, its one
    input wired to ``input_name``."""
    source = graph.input[0].name
    inits = {i.name for i in graph.initializer}

    def name(n: str) -> str:
        if not n:
            return n
        return input_name if n == source else f"{prefix}{n}"

    nodes = []
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        del new.output[:]
        new.input.extend(name(n) for n in node.input)
        new.output.extend(name(n) for n in node.output)
        new.name = f"{prefix}{node.name}"
        nodes.append(new)
    initializers = []
    for init in graph.initializer:
        new = onnx.TensorProto()
        new.CopyFrom(init)
        new.name = name(init.name) if init.name in inits else init.name
        initializers.append(new)
    return nodes, initializers, [name(o.name) for o in graph.output]


def _const(name: str, dtype, dims, values):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name.replace("/", "_"), dtype, dims, values))


def _exit_nodes(k: int, logits: str, prev_out: str | None, prev_margin: str | None,
                threshold: float, criterion: str):
    """Nodes computing ``out{k}`` (each row's answer so far), ``m{k}`` (per row, the best
    ``confidence - threshold`` of exits 0..k: the row has answered where it is >= 0) and
    ``all{k}`` (every row has answered). Kept short on purpose: at batch 1 each node is a
    kernel launch that costs about as much as a small conv's share of the model."""
    p = f"x{k}/"
    nodes = [helper.make_node("Softmax", [logits], [p + "prob"], axis=-1)]
    if criterion == "max_softmax":
        nodes.append(helper.make_node("ReduceMax", [p + "prob"], [p + "conf"], axes=[-1],
                                      keepdims=1))
    else:  # 1 - entropy / log(C) = 1 + sum(p log p) / log(C)
        classes = f"{p}classes_f"
        nodes += [
            _const(p + "eps", TensorProto.FLOAT, [], [1e-12]),
            _const(p + "axis", TensorProto.INT64, [1], [-1]),
            _const(p + "last", TensorProto.INT64, [], [-1]),
            _const(p + "one", TensorProto.FLOAT, [], [1.0]),
            helper.make_node("Max", [p + "prob", p + "eps"], [p + "clip"]),
            helper.make_node("Log", [p + "clip"], [p + "log"]),
            helper.make_node("Mul", [p + "prob", p + "log"], [p + "plogp"]),
            helper.make_node("ReduceSum", [p + "plogp", p + "axis"], [p + "negent"], keepdims=1),
            helper.make_node("Shape", [logits], [p + "shape"]),
            helper.make_node("Gather", [p + "shape", p + "last"], [p + "classes"], axis=0),
            helper.make_node("Cast", [p + "classes"], [classes], to=TensorProto.FLOAT),
            helper.make_node("Log", [classes], [p + "logc"]),
            helper.make_node("Div", [p + "negent", p + "logc"], [p + "ratio"]),
            helper.make_node("Add", [p + "one", p + "ratio"], [p + "conf"]),
        ]
    margin = f"m{k}" if prev_margin is None else p + "margin"
    nodes += [
        _const(p + "t", TensorProto.FLOAT, [], [float(threshold)]),
        _const(p + "zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_node("Sub", [p + "conf", p + "t"], [margin]),  # (B, 1)
    ]
    if prev_margin is None:
        nodes.append(helper.make_node("Identity", [logits], [f"out{k}"]))
    else:  # rows that answered earlier keep their earlier logits
        nodes += [
            helper.make_node("Max", [prev_margin, margin], [f"m{k}"]),
            helper.make_node("GreaterOrEqual", [prev_margin, p + "zero"], [p + "prev"]),
            helper.make_node("Where", [p + "prev", prev_out, logits], [f"out{k}"]),
        ]
    nodes += [
        helper.make_node("ReduceMin", [f"m{k}"], [p + "min"], keepdims=0),
        helper.make_node("GreaterOrEqual", [p + "min", p + "zero"], [f"all{k}"]),
    ]
    return nodes


def _logits_info(name: str, classes: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", classes])


def build_if_graph(segment_files: list[Path], thresholds: list[float], criterion: str,
                   classes: int, path: Path | None = None) -> onnx.ModelProto:
    """The one-graph form of the segments (input as segment 0's, output ``logits``); written
    to ``path`` when given."""
    models = [onnx.load(str(f)) for f in segment_files]
    opset = max(o.version for o in models[0].opset_import if o.domain in ("", "ai.onnx"))
    last = len(models) - 1

    def body(k: int, prev_features: str, prev_out: str | None, prev_margin: str | None):
        """Segment k and everything after it, in the graph (branch) segment k runs in:
        (nodes, its weights, name of the answer). Weights stay in their own branch."""
        nodes, inits, outs = _renamed(models[k].graph, f"s{k}/", prev_features)
        if k == last:
            if prev_margin is None:
                return nodes, inits, outs[0]
            nodes += [_const("f/zero", TensorProto.FLOAT, [], [0.0]),
                      helper.make_node("GreaterOrEqual", [prev_margin, "f/zero"], ["f/prev"]),
                      helper.make_node("Where", ["f/prev", prev_out, outs[0]], ["f/out"])]
            return nodes, inits, "f/out"
        features, logits = outs
        nodes += _exit_nodes(k, logits, prev_out, prev_margin, thresholds[k], criterion)
        rest, rest_inits, answer = body(k + 1, features, f"out{k}", f"m{k}")
        then_graph = helper.make_graph(
            [helper.make_node("Identity", [f"out{k}"], [f"then{k}"])], f"then{k}", [],
            [_logits_info(f"then{k}", classes)])
        rest.append(helper.make_node("Identity", [answer], [f"else{k}"]))
        else_graph = helper.make_graph(rest, f"else{k}", [], [_logits_info(f"else{k}", classes)],
                                       initializer=rest_inits)
        nodes.append(helper.make_node("If", [f"all{k}"], [f"answer{k}"],
                                      then_branch=then_graph, else_branch=else_graph))
        return nodes, inits, f"answer{k}"

    input_info = models[0].graph.input[0]
    nodes, initializers, answer = body(0, input_info.name, None, None)
    nodes.append(helper.make_node("Identity", [answer], ["logits"]))
    graph = helper.make_graph(nodes, "early_exit", [input_info], [_logits_info("logits", classes)],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="lighten.dynamic")
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model
