"""quant.dynamic: int8 Linear weights, run-time activation ranges, integer ops in ONNX Runtime."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.quant.dynamic import (
    DynamicConfig,
    DynamicQuantLinear,
    dynamic_quantize_u8,
    quantize_dynamic_,
)
from lighten.quant.quantizer import sqnr_db

SPEC = {"python": "tests/nowhere.py:net", "input_shape": [1]}


class Block(nn.Module):
    """Pre-norm transformer MLP block: LayerNorm -> Linear -> GELU -> Linear, residual."""

    def __init__(self, d: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def mlp(d_in=20, d=32, classes=5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d), Block(d), Block(d), nn.LayerNorm(d),
                         nn.Linear(d, classes, bias=False)).eval()


def test_dynamic_quantize_matches_onnx_operator():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = helper.make_graph(
        [node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 7])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [None, 7]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed, shift in ((0, 0.0), (1, 3.0), (2, -3.0)):
        x = torch.randn(9, 7, generator=torch.Generator().manual_seed(seed)) + shift
        q, s, z = sess.run(None, {"x": x.numpy()})
        tq, ts, tz = dynamic_quantize_u8(x)
        assert float(ts) == pytest.approx(float(s), rel=1e-6) and int(tz) == int(z)
        assert np.abs(tq.numpy() - q.astype(np.float32)).max() <= 1  # rounding ties at most


def test_transformer_mlp_runs_integer_ops_in_ort_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from lighten.backends import get_backend

    model = mlp()
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(1))
    q = quantize_dynamic_(copy.deepcopy(model), DynamicConfig())
    assert sum(isinstance(m, DynamicQuantLinear) for m in q.modules()) == 6
    with torch.no_grad():
        ref, y = model(x), q(x)
    assert sqnr_db(ref, y) > 25
    compiled = get_backend("onnxruntime", threads=1).compile(
        q, input_shape=(20,), workdir=tmp_path, sample_inputs=x)
    integer = set(compiled.info["integer_ops"])
    assert integer & {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"}
    assert "MatMul" not in compiled.info["op_types"] and "Gemm" not in compiled.info["op_types"]
    out = compiled(x.numpy())
    # the same integer math: within a small fraction of one output quantization step
    layer = q[4]
    step = float(dynamic_quantize_u8(x)[1]) * float(layer.weight_scale.max())
    assert np.abs(out - y.numpy()).max() <= max(step, 1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_are_symmetric_int8_within_half_a_step(per_channel):
    linear = nn.Linear(48, 24)
    q = DynamicQuantLinear.from_float(linear, per_channel=per_channel, reduce_range=False)
    assert q.weight_int.dtype == torch.int8 and int(q.weight_int.abs().max()) == 127
    assert q.weight_scale.numel() == (24 if per_channel else 1)
    err = (q.dequantized_weight() - linear.weight).abs().detach()
    assert float(err.max()) <= float(q.weight_scale.max()) / 2 + 1e-7
    narrow = DynamicQuantLinear.from_float(linear, reduce_range=True)
    assert int(narrow.weight_int.abs().max()) == 63


def test_artifact_bytes_drop_four_times_and_reload_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    f_bytes = save_artifact(model, tmp_path / "f.safetensors", model_spec=SPEC,
                            input_shape=(512,), num_classes=256)
    q = quantize_dynamic_(copy.deepcopy(model), DynamicConfig())
    path = tmp_path / "q.safetensors"
    q_bytes = save_artifact(q, path, model_spec=SPEC, input_shape=(512,), num_classes=256)
    assert 0.24 < q_bytes / f_bytes < 0.27
    skeleton = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    loaded, _ = load_artifact(path, model=skeleton)
    x = torch.randn(8, 512)
    assert isinstance(loaded[2], DynamicQuantLinear) and torch.equal(loaded(x), q(x))


def test_backward_is_straight_through_so_biases_can_finetune():
    q = DynamicQuantLinear.from_float(nn.Linear(8, 4))
    x = torch.randn(5, 8, requires_grad=True)
    q(x).pow(2).sum().backward()
    y = q(x)
    assert q.bias.grad is not None and torch.allclose(
        q.bias.grad, (2 * y).sum(0).detach(), atol=1e-5)
    assert torch.allclose(x.grad, (2 * y).detach() @ q.dequantized_weight(), atol=1e-5)


def test_step_notes_layers_left_float_and_errors():
    from lighten.registry import get_step

    class WithGRU(nn.Module):  # LSTMs are converted (tests/test_dynamic_rnn.py); GRUs are not
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    notes: list[str] = []
    model = quantize_dynamic_(WithGRU(), DynamicConfig(), notes=notes)
    assert isinstance(model.head, DynamicQuantLinear)
    assert any("rnn (GRU) stays float" in n for n in notes)
    assert get_step("quant.dynamic").config_type is DynamicConfig
    with pytest.raises(ValidationError):
        DynamicConfig(bits=16)
    with pytest.raises(ValidationError):
        DynamicConfig(calibration="minmax")
    with pytest.raises(UnsupportedError, match="found no nn.Linear, nn.LSTM or nn.Embedding"):
        quantize_dynamic_(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(UnsupportedError, match="no module named 'x'"):
        quantize_dynamic_(mlp(), DynamicConfig(ignore=["x"]))
