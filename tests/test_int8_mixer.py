"""int8 MLP-Mixer / transformer MLPs on ONNX Runtime: a Linear read only by float ops (GELU,
LayerNorm, residual adds) keeps a float output, and a Linear on (B, T, K) tokens exports as one
Gemm, so ORT runs QGemm with the bias inside and no quantize/dequantize pairs around it."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lighten.export import _torch_export, fold_quantized_weights
from lighten.graph.onnx_simplify import fold_shape_arithmetic, fuse_gelu, linear_as_gemm
from lighten.quant import PTQConfig, quantize_ptq_
from lighten.quant.qdq_graph import complete_qdq
from lighten.task import InputSpec

SHAPE = (16, 12)  # (tokens, dim)


class Block(nn.Module):
    """Two Mixer blocks: token MLP on transposed tokens, channel MLP, LayerNorm, GELU."""

    def __init__(self, tokens=16, dim=12):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict(dict(
                n1=nn.LayerNorm(dim), t1=nn.Linear(tokens, 24), t2=nn.Linear(24, tokens),
                n2=nn.LayerNorm(dim), c1=nn.Linear(dim, 32), c2=nn.Linear(32, dim))))
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):  # (B, tokens, dim)
        for b in self.blocks:
            x = x + b["t2"](self.act(b["t1"](b["n1"](x).transpose(1, 2)))).transpose(1, 2)
            x = x + b["c2"](self.act(b["c1"](b["n2"](x))))
        return self.head(self.norm(x).mean(1))


class Chain(nn.Module):
    """A Linear read by another Linear (through a ReLU-free reshape): keeps its quantizer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 5)
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.head(self.norm(self.b(self.a(x))).mean(1))


def _quantized(model, **kw):
    torch.manual_seed(1)
    return quantize_ptq_(copy.deepcopy(model), torch.randn(128, *SHAPE).split(64),
                         PTQConfig(**kw))


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


def _flags(q):
    return {n: m.output_quant for n, m in q.named_modules() if hasattr(m, "output_quant")}


def test_linears_before_float_ops_keep_float_outputs():
    flags = _flags(_quantized(_model(Block)))
    assert not any(flags.values()), flags  # GELU, LayerNorm, residual adds, the logits
    chain = _flags(_quantized(_model(Chain)))
    assert chain == {"a": True, "b": False, "head": False}  # a feeds the int8 layer b
    torch_flags = _flags(_quantized(_model(Block), backend="torch"))  # its kernels need one
    assert all(v for k, v in torch_flags.items() if k != "head"), torch_flags


def _exported(model):
    proto = _torch_export(model, (InputSpec("input", SHAPE, torch.float32),), 17)
    fold_quantized_weights(proto)
    complete_qdq(proto)
    return proto


def _session(proto, tmp_path=None, optimize=True):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if tmp_path is not None:
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    return ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def test_linear_as_gemm_computes_the_same_and_runs_qgemm(tmp_path):
    model = _model(Block)
    q = _quantized(model)
    proto = _exported(q)
    before = copy.deepcopy(proto)
    assert linear_as_gemm(proto) == 8  # every token/channel Linear; the head is a Gemm already
    assert fuse_gelu(proto) == 4  # still found after the rewrite
    x = np.random.default_rng(0).normal(size=(33, *SHAPE)).astype(np.float32)
    for optimize in (False, True):  # reference kernels and ORT's fused integer kernels
        a = _session(before, optimize=optimize).run(None, {"input": x})[0]
        b = _session(proto, optimize=optimize).run(None, {"input": x})[0]
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    assert np.abs(b - ref).max() < 0.05 * np.abs(ref).max()
    _session(proto, tmp_path)
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QGemm") == 9 and "MatMulIntegerToFloat" not in ops, ops
    assert ops.count("Add") == 4 and ops.count("DequantizeLinear") <= 1, ops  # residuals only


def test_export_of_a_mixer_checks_and_stays_close(tmp_path):
    from lighten.export import export_onnx

    model = _model(Block)
    q = _quantized(model)
    x = torch.randn(64, *SHAPE)
    check = export_onnx(q, tmp_path / "m.onnx", input_shape=SHAPE, sample_inputs=x)
    assert check.by_batch[64][1] >= 0.95
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert sum(n.op_type == "Gemm" for n in graph.node) == 9
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # a float output: no worse


class ChannelsLast(nn.Module):
    """A bias-free Linear on (B, H, W, C) (a ConvNeXt-style MLP) and a residual add."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 24, bias=False), nn.Linear(24, 12)
        self.act, self.head = nn.GELU(), nn.Linear(12, 5)

    def forward(self, x):  # (B, 16, 12) -> (B, 4, 4, 12)
        x = x.view(x.size(0), 4, 4, 12)
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.head(x.mean((1, 2)))


def test_linear_as_gemm_without_bias_on_4d_tokens():
    q = _quantized(_model(ChannelsLast))
    proto = _exported(q)
    fold_shape_arithmetic(proto)
    before = copy.deepcopy(proto)
    assert linear_as_gemm(proto) == 2
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert sorted(len(n.input) for n in gemms) == [2, 3, 3]  # fc1 has no bias; head is 2-D
    x = np.random.default_rng(1).normal(size=(9, *SHAPE)).astype(np.float32)
    a = _session(before).run(None, {"input": x})[0]
    b = _session(proto).run(None, {"input": x})[0]
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
