"""int8 placement beyond ResNets: integer kernels chain through concat, chunk + channel shuffle
and SE gates (no DequantizeLinear -> QuantizeLinear between integer ops), the export's QDQ
completion is exact, and `fallback: auto` keeps the faster form of a layer."""

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.backends import get_backend
from lighten.quant import PTQConfig, quantize_ptq_
from lighten.quant.fallback import LayerTiming, choose_float
from lighten.quant.modules import QuantOutput
from lighten.quant.plan import make_plan
from lighten.quant.ptq import _candidates, fold_with_notes

SHAPE = (3, 16, 16)


def cbr(cin, cout, k=3, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.l1, self.l2 = cbr(16, 16), cbr(32, 16)
        self.trans = cbr(48, 32, 1)
        self.pool = nn.AvgPool2d(2)
        self.l3 = cbr(32, 16)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = self.pool(self.trans(x))
        x = torch.cat([x, self.l3(x)], 1)
        return self.fc(x.mean((2, 3)))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.units = nn.ModuleList(nn.Sequential(cbr(16, 16, 1), cbr(16, 16, 3, 16, False),
                                                 cbr(16, 16, 1)) for _ in range(2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            a, b = x.chunk(2, dim=1)
            x = torch.cat([a, unit(b)], 1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 32)
        self.conv = cbr(32, 32, relu=False)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8),
                                nn.ReLU(), nn.Linear(8, 32), nn.Sigmoid())
        self.relu = nn.ReLU()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(x)
        y = y * self.se(y)[:, :, None, None]
        x = self.relu(x + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _model(cls):
    torch.manual_seed(0)
    model = cls()
    model.train()
    with torch.no_grad():  # BN statistics of real activations, not the init's 0 / 1
        for _ in range(4):
            model(torch.randn(32, *SHAPE))
    return model.eval()


def _quantize(model, **cfg):
    torch.manual_seed(1)
    calib = torch.randn(128, *SHAPE)
    return quantize_ptq_(copy.deepcopy(model), calib.split(32), PTQConfig(**cfg))


def _ort(model, tmp_path, name):
    return get_backend("onnxruntime", threads=1).compile(
        model, input_shape=SHAPE, workdir=tmp_path / name,
        sample_inputs=torch.randn(16, *SHAPE))


def _dq_q_pairs(path) -> int:
    graph = onnx.load(path, load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    return sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer
               and producer[n.input[0]].op_type == "DequantizeLinear")


@pytest.mark.parametrize("cls, expected, float_free", [
    (Dense, {"QLinearConv", "QLinearConcat", "QLinearAveragePool"}, {"Concat", "AveragePool"}),
    (Shuffle, {"QLinearConv", "QLinearConcat"}, set()),  # its Concats left build shapes
    (SE, {"QLinearConv", "QLinearSigmoid", "QLinearGlobalAveragePool", "QGemm"},
     {"Sigmoid"}),
])
def test_integer_kernels_chain(cls, expected, float_free, tmp_path):
    q = _quantize(_model(cls))
    compiled = _ort(q, tmp_path, cls.__name__)
    ops = compiled.info["op_types"]
    assert expected <= set(compiled.info["integer_ops"]), ops
    assert not float_free & set(ops), ops  # these run as integer kernels, not in float
    assert _dq_q_pairs(compiled.info["optimized_path"]) == 0
    # the data ops of the concat/shuffle models carry int8: no dequantize inside the network
    if cls is not SE:
        assert ops.get("DequantizeLinear", 0) <= 1, ops
    if cls is Shuffle:  # both units' data concats are integer
        assert ops["QLinearConcat"] == 2, ops


def test_concat_members_share_one_grid():
    model = _model(Dense)
    fold_with_notes(model, [])
    plan = make_plan(model, _candidates(model, [], []), integer_ops=True)
    groups = [set(g) for g in plan.groups]
    assert {"stem.0", "l1.0", "l2.0"} in groups
    assert {"pool", "l3.0"} in groups  # the pool before a concat gets an output quantizer
    assert "pool" in plan.outputs
    qat_plan = make_plan(model, _candidates(model, [], []))  # quant.qat: unchanged placement
    assert qat_plan.groups == [] and qat_plan.outputs == []
    q = _quantize(_model(Dense))
    scales = {float(q.get_submodule(n).out_scale) for n in ("stem.0", "l1.0", "l2.0")}
    assert len(scales) == 1


@pytest.mark.parametrize("cls", [Dense, Shuffle, SE])
def test_quantized_outputs_close_to_float(cls, tmp_path):
    model = _model(cls)
    q = _quantize(model)
    x = torch.randn(256, *SHAPE)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    deployed = _ort(q, tmp_path, "q")(x.numpy())  # what ORT runs computes the same
    assert np.abs(deployed - out.numpy()).max() < 0.05 * ref.abs().max()


def test_qdq_completion_is_exact(tmp_path):
    """The inserted Q->DQ pairs change no value: same outputs with and without them."""
    import onnxruntime as ort

    from lighten.export import _torch_export, fold_quantized_weights
    from lighten.quant.qdq_graph import complete_qdq
    from lighten.task import InputSpec

    q = _quantize(_model(Shuffle))
    proto = _torch_export(q, (InputSpec("input", SHAPE, torch.float32),), 17)
    fold_quantized_weights(proto)
    before = proto.SerializeToString()
    assert complete_qdq(proto) > 0
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = {"input": np.random.default_rng(0).normal(size=(8, *SHAPE)).astype(np.float32)}
    a = ort.InferenceSession(before, opts, providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(proto.SerializeToString(), opts,
                             providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(a, b)


def test_fallback_decision_from_given_timings():
    timings = {"conv1": LayerTiming(int8_ms=0.9, float_ms=0.2),  # int8 loses: float
               "conv2": LayerTiming(int8_ms=0.3, float_ms=0.6),  # int8 wins
               "depthwise": (0.5, 0.49),  # (int8, float) pairs work too
               "tie": (0.4, 0.4)}  # a tie stays int8
    assert choose_float(timings) == ["conv1", "depthwise"]
    assert choose_float({}) == []


def test_fallback_auto_runs_and_reports(tmp_path):
    notes: list[str] = []
    model = _model(SE)
    calib = torch.randn(64, *SHAPE)
    q = quantize_ptq_(copy.deepcopy(model), calib.split(32), PTQConfig(fallback="auto"),
                      notes=notes)
    assert any("fallback: auto" in n for n in notes) or all(
        "left in float" not in n for n in notes)
    for n in notes:  # every fallback names its two timings
        if n.endswith("(fallback: auto)"):
            assert "int8" in n and "float" in n and " ms " in n
    _ort(q, tmp_path, "fallback")  # still exports and verifies


def test_quant_output_survives_artifact(tmp_path):
    """The edit log rebuilds QuantOutput around the original sigmoid from a fresh source."""
    import inspect

    from conftest import write_models_module

    source = ("import torch\nfrom torch import nn\n\n" + inspect.getsource(cbr) + "\n"
              + inspect.getsource(SE) + "\n\ndef se(**kw):\n    return SE()\n")
    path, module = write_models_module(tmp_path, "se_net", source)
    torch.manual_seed(0)
    model = module.se()
    model.train()
    with torch.no_grad():
        model(torch.randn(32, *SHAPE))
    q = _quantize(model.eval())
    assert isinstance(q.se[5], QuantOutput)
    out = tmp_path / "se.safetensors"
    spec = {"python": f"{path}:se", "input_shape": list(SHAPE)}
    save_artifact(q, out, model_spec=spec, input_shape=SHAPE, num_classes=10)
    loaded, _ = load_artifact(out)
    assert isinstance(loaded.se[5], QuantOutput) and isinstance(loaded.se[5].module, nn.Sigmoid)
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x))
