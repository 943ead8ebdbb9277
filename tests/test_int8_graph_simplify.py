"""Exact ONNX simplifications at export (lighten.graph.onnx_simplify): x.size() arithmetic folded
to constants (any batch size still runs), int8 depthwise convs padded to 16 channels (same int8
outputs, still integer kernels), and `fallback: auto`'s candidate sets."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lighten.export import _torch_export, fold_quantized_weights
from lighten.graph.onnx_simplify import (
    fold_shape_arithmetic,
    fold_shuffle_into_convs,
    pad_depthwise_channels,
    pad_input_channels,
)
from lighten.quant import PTQConfig, quantize_ptq_
from lighten.quant.fallback import LayerTiming, candidate_sets
from lighten.quant.qdq_graph import complete_qdq
from lighten.task import InputSpec

SHAPE = (3, 12, 12)


def cbr(cin, cout, k=3, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class Shuffle(nn.Module):
    """ShuffleNetV2-style units with 24-channel depthwise convs (not a multiple of 16)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 48)
        self.units = nn.ModuleList(nn.Sequential(cbr(24, 24, 1), cbr(24, 24, 3, 24, False),
                                                 cbr(24, 24, 1)) for _ in range(2))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            a, b = x.chunk(2, dim=1)
            x = torch.cat([a, unit(b)], 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(x.view(x.size(0), -1, 12 * 12).mean(2))


class Odd(nn.Module):
    """Reshapes whose sizes do not simply copy the batch: (2b, -1) and (b * c, h * w)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 144, 10)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        z = y.reshape(b * c, h * w).softmax(1).reshape(b, c, h, w)
        z = z.view(2 * b, -1).view(b, -1)
        return self.fc(z)


class Residual(nn.Module):
    """A depthwise conv whose input is also added to its output: the pad region ends at an Add,
    so nothing is padded."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 24, 1)
        self.dw = cbr(24, 24, 3, 24, relu=False)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc((x + self.dw(x)).mean((2, 3)))


def _trained(cls):
    torch.manual_seed(0)
    model = cls()
    model.train()
    with torch.no_grad():  # BN statistics of real activations
        for _ in range(3):
            model(torch.randn(16, *SHAPE))
    return model.eval()


def _quantized(cls):
    torch.manual_seed(1)
    return quantize_ptq_(copy.deepcopy(_trained(cls)), torch.randn(64, *SHAPE).split(32),
                         PTQConfig())


def _exported(model):
    """The graph as export_onnx builds it, before the simplification."""
    proto = _torch_export(model, (InputSpec("input", SHAPE, torch.float32),), 17)
    fold_quantized_weights(proto)
    complete_qdq(proto)
    return proto


def _run(proto, x, *, optimize=False):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _inputs(batch):
    return np.random.default_rng(batch).normal(size=(batch, *SHAPE)).astype(np.float32)


def test_shape_arithmetic_folds_and_any_batch_still_runs():
    model = _trained(Shuffle)
    proto = _exported(model)
    before = copy.deepcopy(proto)
    ops_before = {n.op_type for n in proto.graph.node}
    assert "Shape" in ops_before and "Gather" in ops_before
    assert fold_shape_arithmetic(proto) > 0
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Shape", "Gather", "Unsqueeze", "Div"}, ops
    for batch in (1, 3, 64):  # batch sizes other than the folding's own (7, 13) too
        x = _inputs(batch)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        out = _run(proto, x)
        assert out.shape == ref.shape
        assert np.abs(out - _run(before, x)).max() <= 1e-5
        assert np.abs(out - ref).max() <= 1e-4


def test_batch_dependent_sizes_stay_correct():
    """(b * c, h * w) and (2b, -1) are not a copied batch axis: folded only where exact."""
    model = _trained(Odd)
    proto = _exported(model)
    before = copy.deepcopy(proto)
    assert fold_shape_arithmetic(proto) >= 2  # (b * c, h * w) -> (-1, 144), back -> (-1, 8, ..)
    for batch in (1, 2, 5):
        x = _inputs(batch)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_run(proto, x), _run(before, x), atol=1e-5)
        np.testing.assert_allclose(_run(proto, x), ref, atol=1e-4)


def test_int8_shape_folding_gives_identical_outputs():
    q = _quantized(Shuffle)
    proto = _exported(q)
    before = copy.deepcopy(proto)
    assert fold_shape_arithmetic(proto) > 0
    for batch in (1, 9):
        x = _inputs(batch)
        np.testing.assert_array_equal(_run(proto, x, optimize=True),
                                      _run(before, x, optimize=True))


def test_depthwise_padding_is_exact_and_stays_integer(tmp_path):
    q = _quantized(Shuffle)
    proto = _exported(q)
    fold_shape_arithmetic(proto)
    before = copy.deepcopy(proto)
    assert pad_depthwise_channels(proto) == 2  # both units' 24-channel depthwise convs
    groups = sorted(a.i for n in proto.graph.node if n.op_type == "Conv"
                    for a in n.attribute if a.name == "group" and a.i > 1)
    assert groups == [32, 32]
    for batch in (1, 16):  # the int8 kernels compute exactly the same numbers
        x = _inputs(batch)
        np.testing.assert_array_equal(_run(proto, x, optimize=True),
                                      _run(before, x, optimize=True))
        np.testing.assert_array_equal(_run(proto, x), _run(before, x))  # reference kernels
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == 7, ops  # all still integer


def test_depthwise_padding_leaves_a_region_it_cannot_pad():
    proto = _exported(_quantized(Residual))
    before = proto.SerializeToString()
    assert pad_depthwise_channels(proto) == 0
    assert proto.SerializeToString() == before


def test_export_applies_both(tmp_path):
    from lighten.export import export_onnx

    q = _quantized(Shuffle)
    check = export_onnx(q, tmp_path / "m.onnx", input_shape=SHAPE,
                        sample_inputs=torch.randn(16, *SHAPE))
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert not any(n.op_type == "Shape" for n in graph.node)
    assert any(a.name == "group" and a.i == 32 for n in graph.node for a in n.attribute)
    assert check.by_batch[1][1] >= 0.95  # verified against PyTorch at batch 1 and 64


def test_fallback_candidate_sets_rank_by_lost_time():
    timings = {"stem": LayerTiming(0.9, 0.2), "dw1": (0.31, 0.10), "dw2": (0.30, 0.12),
               "pw": (0.05, 0.04), "win": (0.1, 0.3)}
    losing = ["dw1", "dw2", "pw", "stem"]
    assert candidate_sets(timings, losing) == [
        ["stem"], ["dw1", "stem"], ["dw1", "dw2", "pw", "stem"]]
    assert candidate_sets(timings, ["pw"]) == [["pw"]]


class AddNorm(nn.Module):
    """A residual add before a LayerNorm: what ORT would fuse into SkipLayerNormalization."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.fc(x))


def test_ort_backend_keeps_add_and_layernorm_apart(tmp_path):
    """ORT 1.32's SkipLayerNormalization kernel is many times slower than Add + LayerNorm."""
    from lighten.backends import get_backend

    compiled = get_backend("onnxruntime", threads=1).compile(
        AddNorm().eval(), input_shape=(8, 16), workdir=tmp_path / "m",
        sample_inputs=torch.randn(4, 8, 16))
    ops = compiled.info["op_types"]
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops, ops


class MLP(nn.Module):
    """Linear -> GELU -> Linear over tokens, as in a Mixer or ViT block."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head((x + self.fc2(self.act(self.fc1(x)))).mean(1))


def test_gelu_becomes_one_node_and_computes_the_same(tmp_path):
    from lighten.graph.onnx_simplify import fuse_gelu

    shape = (8, 16)
    torch.manual_seed(0)
    model = MLP().eval()
    x = np.random.default_rng(0).normal(size=(32, *shape)).astype(np.float32)
    for m in (model, quantize_ptq_(copy.deepcopy(model), torch.randn(64, *shape).split(32),
                                   PTQConfig())):
        proto = _torch_export(m, (InputSpec("input", shape, torch.float32),), 17)
        fold_quantized_weights(proto)
        complete_qdq(proto)
        before = copy.deepcopy(proto)
        assert fuse_gelu(proto) == 1
        assert not any(n.op_type in ("Erf", "Div") for n in proto.graph.node)
        a, b = _run(before, x, optimize=True), _run(proto, x, optimize=True)
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
    opts = ort.SessionOptions()  # the int8 graph: one Gelu between the integer matmuls
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert "Erf" not in ops and ops.count("Gelu") + ops.count("BiasGelu") == 1, ops


def _optimized_ops(proto, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]


def shuffle(x, groups=2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleToConvs(nn.Module):
    """Shuffles read only by convs (ShuffleNetV2's stride-2 unit and last conv): one by a
    depthwise conv (whose result a 1x1 conv reads) and a 1x1 conv, one by a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.a, self.b = cbr(32, 16, 1), cbr(32, 16, 1)
        self.branch1 = nn.Sequential(cbr(32, 32, 3, 32, relu=False), cbr(32, 16, 1))
        self.branch2 = cbr(32, 16, 1)
        self.last = cbr(32, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = shuffle(torch.cat([self.a(x), self.b(x)], 1))
        x = shuffle(torch.cat([self.branch1(x), self.branch2(x)], 1))
        return self.fc(self.last(x).mean((2, 3)))


def test_shuffles_read_by_convs_fold_into_their_weights(tmp_path):
    q = _quantized(ShuffleToConvs)
    proto = _exported(q)
    fold_shape_arithmetic(proto)  # the shuffle's sizes are constants first
    before = copy.deepcopy(proto)
    assert fold_shuffle_into_convs(proto) == 2
    assert not any(n.op_type in ("Transpose", "Reshape") for n in proto.graph.node)
    for batch in (1, 5):  # the same integer sums: the same outputs, bit for bit
        x = _inputs(batch)
        np.testing.assert_array_equal(_run(proto, x, optimize=True),
                                      _run(before, x, optimize=True))
        np.testing.assert_allclose(_run(proto, x), _run(before, x), rtol=0, atol=1e-5)
    ops = _optimized_ops(proto, tmp_path)
    assert ops.count("QLinearConv") == 7 and "Conv" not in ops, ops
    assert ops.count("Transpose") == 2, ops  # only NCHW -> NHWC at the input, back at the end
    assert fold_shuffle_into_convs(_exported(_quantized(Shuffle))) == 0  # a chunk reads those


def test_export_of_shuffles_runs_the_same_on_openvino(tmp_path):
    """The folded file is portable: OpenVINO computes what ONNX Runtime does (a Gather form of
    the shuffle would not be: OpenVINO 2026.4 gets Concat -> Gather -> 1x1 Conv wrong)."""
    pytest.importorskip("openvino")
    from lighten.backends import get_backend

    q = _quantized(ShuffleToConvs)
    x = torch.from_numpy(_inputs(32))
    compiled = get_backend("openvino", threads=1).compile(  # checks against PyTorch itself
        q, input_shape=SHAPE, workdir=tmp_path / "ov", sample_inputs=x)
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(compiled(x.numpy()) - ref).max() < 0.05 * np.abs(ref).max()


def test_first_conv_input_padded_to_four_channels(tmp_path):
    """The stem conv reads 3 quantized channels: padded with the zero point to 4, exactly."""
    q = _quantized(Shuffle)
    proto = _exported(q)
    before = copy.deepcopy(proto)
    assert pad_input_channels(proto) == 1
    assert pad_input_channels(proto) == 0  # already a multiple of 4
    stem = [n for n in proto.graph.node if n.op_type == "Pad"]
    assert len(stem) == 1
    for batch in (1, 16):
        x = _inputs(batch)
        np.testing.assert_array_equal(_run(proto, x, optimize=True),
                                      _run(before, x, optimize=True))
        np.testing.assert_array_equal(_run(proto, x), _run(before, x))
    ops = _optimized_ops(proto, tmp_path)
    assert "Conv" not in ops and ops.count("QLinearConv") == 7, ops
