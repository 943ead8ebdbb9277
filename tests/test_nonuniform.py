"""Power-of-two weight levels: nearest-level rounding, weight-only layers, ONNX and artifacts."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.quant.nonuniform import (
    Pow2Conv2d,
    Pow2Linear,
    level_table,
    pow2_dequantize,
    pow2_quantize,
    pow2_rtn,
)
from lighten.quant.quantizer import sqnr_db
from lighten.quant.weight_only import WeightOnlyConfig, quantize_weight_only_

SPEC = {"python": "tests/nowhere.py:net", "input_shape": [1]}


def brute_force(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Distance from each value to its nearest level, by trying every level."""
    levels = scale * level_table(bits).double()
    return (x.double()[:, None] - levels[None, :]).abs().min(dim=1).values


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8),
       scale=st.floats(1e-3, 1e3),
       values=st.lists(st.floats(-2e3, 2e3, width=32), min_size=1, max_size=64))
def test_rounds_to_the_nearest_level(bits, scale, values):
    x = torch.tensor(values, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    codes = pow2_quantize(x, s, bits)
    top = 2 ** (bits - 1) - 1
    assert int(codes.abs().max()) <= top
    error = (x.double() - pow2_dequantize(codes, s, bits).double()).abs()
    best = brute_force(x, float(s), bits)
    assert torch.allclose(error, best, rtol=1e-5, atol=1e-6 * float(s))
    # inside [smallest level, 1] the nearest level is never more than 1/3 off (midpoint rule)
    m = x.abs() / s
    inside = (m >= 2.0 ** (1 - top)) & (m <= 1)
    assert (error[inside] <= x.abs()[inside].double() / 3 + 1e-6 * float(s)).all()


def test_level_table_and_the_midpoint_rule():
    assert level_table(4).tolist() == [-1, -0.5, -0.25, -0.125, -0.0625, -0.03125, -0.015625, 0,
                                       0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5, 1]
    assert level_table(2).tolist() == [-1, 0, 1]  # ternary
    one = torch.tensor(1.0)
    # 0.72 is nearer to 0.5 than to 1, although log2(0.72) = -0.47 rounds to exponent 0
    assert pow2_dequantize(pow2_quantize(torch.tensor([0.72, 0.76, -0.72]), one, 4), one,
                           4).tolist() == [0.5, 1.0, -0.5]
    # below the smallest level (1/64): nearest of {0, 1/64}
    small = torch.tensor([0.007, 0.008, 0.0, 5.0])
    assert pow2_dequantize(pow2_quantize(small, one, 4), one, 4).tolist() == [
        0.0, 0.015625, 0.0, 1.0]


def test_pow2_rtn_groups_and_scales():
    w = torch.randn(6, 10)
    q, scale, zero = pow2_rtn(w, group_size=4, bits=3)  # groups of 4, 4, 2 columns
    assert q.shape == (6, 10) and scale.shape == (6, 3) and not zero.any()
    amax = w[:, 8:].abs().amax(1)
    assert (scale[:, 2] <= amax * 1.001).all()
    assert (scale[:, 2] >= amax * 2 ** (-7 / 8) * 0.999).all()
    assert int(q.abs().max()) <= 3
    assert torch.equal(q[:, 4:8], pow2_quantize(w[:, 4:8], scale[:, 1:2], 3))
    # the phase search never does worse than scale = amax
    _, plain, _ = pow2_rtn(w, group_size=4, bits=3, phases=1)
    def err(s):
        blocks = w.reshape(6, -1)
        full = torch.cat([s[:, :1].expand(6, 4), s[:, 1:2].expand(6, 4), s[:, 2:].expand(6, 2)], 1)
        return (pow2_dequantize(pow2_quantize(blocks, full, 3), full, 3) - blocks).pow(2).sum()
    assert err(scale) <= err(plain)


def conv_model(seed=0) -> nn.Sequential:
    """Bell-shaped weights, as trained layers have (what log levels suit)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 10)).eval()
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.weight.normal_(0, 0.1)
    return model


def test_weight_only_pow2_exports_int8_codes_and_onnxruntime_matches(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from lighten.export import export_onnx

    model = conv_model()
    q = quantize_weight_only_(copy.deepcopy(model),
                              WeightOnlyConfig.model_validate({"bits": 4, "levels": "pow2"}))
    assert isinstance(q[0], Pow2Conv2d) and isinstance(q[3], Pow2Linear)
    uniform3 = quantize_weight_only_(copy.deepcopy(model), WeightOnlyConfig(bits=3, method="rtn"))
    x = torch.randn(32, 3, 6, 6)
    with torch.no_grad():  # 7 magnitudes per sign beat 3-bit uniform's 4 (measured 13.5 vs 10.8)
        assert sqnr_db(model(x), q(x)) > max(12.0, sqnr_db(model(x), uniform3(x)) + 1)
    check = export_onnx(q, tmp_path / "m.onnx", input_shape=(3, 6, 6), sample_inputs=x)
    assert check.max_abs_diff < 1e-4 and check.agreement == 1.0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["0.weight_int"] == onnx.TensorProto.INT8
    assert types["3.weight_int"] == onnx.TensorProto.INT8
    assert "Gather" in {n.op_type for n in proto.graph.node}


def test_artifact_round_trip_restores_the_same_weights(tmp_path):
    model = nn.Sequential(nn.Linear(512, 256)).eval()
    float_bytes = save_artifact(model, tmp_path / "f.safetensors", model_spec=SPEC,
                                input_shape=(512,), num_classes=256)
    q = quantize_weight_only_(copy.deepcopy(model),
                              WeightOnlyConfig(bits=4, levels="pow2", method="rtn"))
    q_bytes = save_artifact(q, tmp_path / "q.safetensors", model_spec=SPEC, input_shape=(512,),
                            num_classes=256)
    assert q_bytes < 0.2 * float_bytes  # 4-bit codes, two per byte, plus float16 scales
    loaded, _ = load_artifact(tmp_path / "q.safetensors", model=nn.Sequential(nn.Linear(512, 256)))
    assert type(loaded[0]) is Pow2Linear
    assert torch.equal(loaded[0].dequantized_weight(), q[0].dequantized_weight())
    x = torch.randn(4, 512)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_refused_options_say_what_to_do():
    with pytest.raises(UnsupportedError, match="method: rtn"):
        quantize_weight_only_(conv_model(), WeightOnlyConfig(levels="pow2", method="gptq"),
                              [torch.randn(4, 3, 6, 6)])
    with pytest.raises(UnsupportedError, match="symmetric"):
        quantize_weight_only_(conv_model(), WeightOnlyConfig(levels="pow2", symmetric=False))
