"""Quantization: textbook math, observers, PTQ quality floors, ORT integer kernels, torch int8."""

import collections
import copy
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lighten.errors import RecipeError, UnsupportedError
from lighten.quant import (
    PTQConfig,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    is_quantized,
    quantize,
    to_torch_int8,
)
from lighten.quant.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    quantization_mse,
)
from lighten.quant.quantizer import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    sqnr_db,
    weight_qparams,
)
from lighten.quant.quantizer import (
    quantize as quantize_tensor,
)

# ---------------------------------------------------------------- math


@pytest.mark.parametrize("bits,signed,symmetric", [(8, False, False), (8, True, True),
                                                   (4, True, False), (2, False, False)])
def test_round_trip_matches_textbook_and_error_below_half_scale(bits, signed, symmetric):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric)
    x = torch.linspace(-1.3, 2.1, 1001)
    scale, zp = compute_qparams(x.min(), x.max(), spec)
    q = quantize_tensor(x, scale, zp, spec.qmin, spec.qmax)
    textbook = torch.clamp(torch.round(x / scale) + zp, spec.qmin, spec.qmax)
    assert torch.equal(q.float(), textbook)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    err = (dequantize(q, scale, zp) - x).abs().max()
    assert err <= scale / 2 + 1e-6
    # PyTorch's fake-quant multiplies by 1/scale: a rounding tie may land one step away
    diff = (fake_quantize(x, scale, zp, spec) - dequantize(q, scale, zp)).abs()
    assert diff.max() <= scale * 1.001 and (diff > 1e-6).float().mean() < 0.01


def test_ranges_and_bad_bits():
    assert (QuantSpec(bits=8, symmetric=True).qmin, QuantSpec(bits=8).qmax) == (-127, 127)
    assert (QuantSpec(bits=8, symmetric=False, signed=False).qmax) == 255
    assert QuantSpec(bits=8, reduce_range=True).qmax == 63
    assert QuantSpec(bits=4, symmetric=False).qmin == -8
    with pytest.raises(UnsupportedError, match="bits=9"):
        QuantSpec(bits=9)
    with pytest.raises(ValidationError):
        PTQConfig(bits=1)


def test_per_channel_weight_scales():
    w = torch.randn(8, 3, 3, 3) * torch.arange(1, 9).reshape(8, 1, 1, 1)
    spec = QuantSpec(bits=8, per_channel=True)
    scale, zp = weight_qparams(w, spec)
    assert scale.shape == (8,) and zp.shape == (8,) and int(zp.abs().sum()) == 0
    expected = w.abs().amax(dim=(1, 2, 3)) / 127
    assert torch.allclose(scale, expected)
    err = (fake_quantize(w, scale, zp, spec) - w).abs().amax(dim=(1, 2, 3))
    assert torch.all(err <= scale / 2 + 1e-6)


# ---------------------------------------------------------------- observers


def _heavy_tailed(n=20000):
    torch.manual_seed(0)
    return torch.distributions.StudentT(2.0).sample((n,))  # heavy tails


def test_observers_ranges():
    x = _heavy_tailed()
    mm, pct, mse, ema = (MinMaxObserver(), PercentileObserver(99.0), MSEObserver(),
                         MovingAverageMinMaxObserver())
    for chunk in x.split(2000):
        for obs in (mm, pct, mse, ema):
            obs.observe(chunk)
    lo, hi = mm.range()
    assert (lo, hi) == (float(x.min()), float(x.max()))
    p_lo, p_hi = pct.range()
    assert lo < p_lo < 0 < p_hi < hi
    e_lo, e_hi = ema.range()
    assert lo <= e_lo and e_hi <= hi
    spec = mse.spec
    best = quantization_mse(x, mse.range(), spec)
    for ratio in (1.0, 0.5, 0.2, 0.1, 0.05, 0.02):  # the search beats every other clipping
        assert best <= quantization_mse(x, (lo * ratio, hi * ratio), spec) * 1.02
    assert best < 0.98 * quantization_mse(x, (lo, hi), spec)
    with pytest.raises(UnsupportedError, match="saw no data"):
        MinMaxObserver().range()


# ---------------------------------------------------------------- models


class TinyResNet(nn.Module):
    """conv-bn-relu stem, one residual block with a 1x1 projection, avg pool, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.conv2(out) + self.short(x))
        return self.fc(torch.flatten(self.pool(out), 1))


def _lenet():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 5))


def _float_model(factory):
    torch.manual_seed(0)
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _data(n=320, seed=0):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def _ptq(model, config=None, notes=None):
    x = _data()
    return quantize(copy.deepcopy(model), list(x.split(64)), config or PTQConfig(), notes=notes)


@pytest.fixture(scope="module")
def tiny_pair():
    f = _float_model(TinyResNet)
    return f, _ptq(f)


def test_ptq_keeps_agreement_and_sqnr(tiny_pair):
    f, q = tiny_pair
    x = _data(300, seed=1)
    with torch.no_grad():
        ref, out = f(x), q(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.98
    assert sqnr_db(ref, out) > 25
    assert is_quantized(q) and not is_quantized(f)
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) == 4
    assert isinstance(q.fc, QuantLinear) and isinstance(q.relu2, QuantAct)
    assert q.conv1.activation == "relu" and isinstance(q.relu1, nn.Identity)
    assert q.fc.output_quant is False  # logits stay float
    assert q.conv1.weight_int.dtype == torch.int8 and q.conv1.weight_scale.shape == (16,)


@pytest.mark.parametrize("calibration", ["percentile", "mse", "moving_average"])
def test_ptq_calibrations_and_low_bits(calibration):
    f = _float_model(_lenet)
    x = _data(200, seed=2)
    with torch.no_grad():
        ref = f(x)
        q8 = _ptq(f, PTQConfig(calibration=calibration, percentile=99.9))
        q4 = _ptq(f, PTQConfig(bits=4, calibration=calibration))
        s8, s4 = sqnr_db(ref, q8(x)), sqnr_db(ref, q4(x))
    assert s8 > 20 and s4 > 5 and s8 > s4 + 6
    assert int(q4[0].weight_int.abs().max()) <= 7


def _ort_op_counts(model, tmp_path, shape=(1, 12, 12)):
    import onnxruntime as ort

    from lighten.export import export_onnx

    check = export_onnx(model, tmp_path / "m.onnx", input_shape=shape, sample_inputs=_data(32))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(check.path), so, providers=["CPUExecutionProvider"])
    import onnx

    graph = onnx.load(str(tmp_path / "opt.onnx")).graph
    stored = {i.name: i.data_type for i in onnx.load(str(check.path)).graph.initializer}
    return check, collections.Counter(n.op_type for n in graph.node), stored


def test_ort_runs_every_quantized_layer_on_integer_kernels(tiny_pair, tmp_path):
    f, q = tiny_pair
    check, ops, stored = _ort_op_counts(q, tmp_path)
    assert check.agreement >= 0.95
    assert ops["QLinearConv"] + ops["ConvInteger"] == 4
    assert ops["QGemm"] + ops["QLinearMatMul"] + ops["MatMulInteger"] == 1
    assert ops["Conv"] == 0 and ops["Gemm"] == 0 and ops["MatMul"] == 0
    assert ops["QLinearAdd"] == 1  # the residual add runs on int8 too
    from onnx import TensorProto

    int8 = TensorProto.INT8
    assert sum(1 for t in stored.values() if t == int8) >= 5  # weights stored as int8


def test_ort_lenet_is_integer_end_to_end(tmp_path):
    q = _ptq(_float_model(_lenet))
    _, ops, _ = _ort_op_counts(q, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] + ops["QLinearMatMul"] == 2
    assert ops["DequantizeLinear"] == 0  # the pool runs on int8 and the head outputs float


def test_artifact_config_round_trip(tiny_pair):
    _, q = tiny_pair
    for layer in (q.conv1, q.fc, q.relu2):
        config = json.loads(json.dumps(layer.artifact_config()))
        fresh = type(layer).from_artifact(config)
        assert {k: v.shape for k, v in fresh.state_dict().items()} == \
            {k: v.shape for k, v in layer.state_dict().items()}
        fresh.load_state_dict(layer.state_dict())
        x = torch.rand(3, *((8, 12, 12) if layer is q.conv1 else (16,) if layer is q.fc
                            else (16, 6, 6)))
        with torch.no_grad():
            assert torch.equal(fresh(x), layer(x))
    from lighten.modules import get_module_type, registered_key

    assert get_module_type(registered_key(q.conv1)) is QuantConv2d


def test_to_torch_int8_matches_fake_quant(tiny_pair):
    _, q = tiny_pair
    t = to_torch_int8(q)
    assert isinstance(q.conv1, QuantConv2d)  # the original is untouched
    assert isinstance(t.conv1.qlayer, torch.ao.nn.quantized.Conv2d)
    x = _data(200, seed=3)
    with torch.no_grad():
        ref, out = q(x), t(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.98
    assert (ref - out).abs().max() < 4 * float(q.fc.out_scale)


def test_to_torch_int8_names_unsupported_layer():
    conv = QuantConv2d.from_float(nn.Conv2d(2, 2, 3, padding="same"))
    with pytest.raises(UnsupportedError, match="^0: padding='same'"):
        to_torch_int8(nn.Sequential(conv))


# ---------------------------------------------------------------- the step


def _context(n=128):
    from lighten.data import DataBundle
    from lighten.step import StepContext

    x = _data(n)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.int64))
    bundle = DataBundle("tiny", ds, ds, (1, 12, 12), 5)
    return StepContext(data=bundle, train_config=None, baseline=None, workdir=None,
                       progress=False)


def test_step_ignore_and_notes():
    from lighten.registry import get_step

    step = get_step("quant.ptq")
    assert step.config_type is PTQConfig
    ctx = _context()
    cfg = PTQConfig(calib_samples=64, ignore=["stem"])
    q = step.apply(_float_model(TinyResNet), cfg, ctx)
    assert isinstance(q.stem[0], nn.Conv2d) and isinstance(q.conv1, QuantConv2d)
    assert any("stem.0 left in float" in n for n in ctx.notes)
    with pytest.raises(RecipeError, match="no module named 'nope'"):
        step.apply(_float_model(TinyResNet), PTQConfig(ignore=["nope"]), ctx)


def test_unreached_layer_stays_float():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)

    notes = []
    q = quantize(Branchy(), [torch.randn(8, 4)], PTQConfig(), notes=notes)
    assert isinstance(q.a, QuantLinear) and isinstance(q.unused, nn.Linear)
    assert any("unused left in float" in n for n in notes)


def test_backend_torch_runs_integer_engine():
    q = _ptq(_float_model(TinyResNet), PTQConfig(backend="torch"))
    assert q.conv1.act_signed is False
    out = to_torch_int8(q)(_data(4))
    assert out.shape == (4, 5) and np.isfinite(out.numpy()).all()
