"""ONNX export: float parity, int8 weight folding, and clear errors."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from lighten.errors import ExportError
from lighten.export import export_onnx, quantize_linear


class ResBlockNet(nn.Module):
    """Conv + BN + residual add + linear head: the shapes the zoo uses."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


class FakeQuantNet(nn.Module):
    """Per-channel int8 fake-quantized weights, per-tensor fake-quantized activations."""

    def __init__(self, width=32, *, fake_quant=True):
        super().__init__()
        self.fake_quant = fake_quant
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 8 * 8, 10)
        for name, w in (("conv", self.conv.weight), ("fc", self.fc.weight)):
            amax = w.detach().abs().flatten(1).amax(1)
            self.register_buffer(f"{name}_scale", amax / 127)
            self.register_buffer(f"{name}_zero", torch.zeros(w.shape[0], dtype=torch.int32))

    def forward(self, x):
        if not self.fake_quant:
            return self.fc(F.relu(self.conv(x)).flatten(1))
        w = torch.fake_quantize_per_channel_affine(
            self.conv.weight, self.conv_scale, self.conv_zero, 0, -128, 127)
        x = F.relu(F.conv2d(x, w, self.conv.bias, padding=1))
        x = torch.fake_quantize_per_tensor_affine(x, 0.02, 0, -128, 127)
        w = torch.fake_quantize_per_channel_affine(
            self.fc.weight, self.fc_scale, self.fc_zero, 0, -128, 127)
        return F.linear(x.flatten(1), w, self.fc.bias)


def _trained_bn(model):
    """Give BN non-trivial running statistics so eval mode matters."""
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model


def test_float_export_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = _trained_bn(ResBlockNet())
    model.train()
    check = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8))
    assert model.training  # the training flag is restored
    assert check.path.stat().st_size == check.bytes > 0
    assert check.max_abs_diff < 1e-4 and check.agreement == 1.0
    assert not check.quantized
    import onnxruntime as ort

    sess = ort.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 8, 8)  # dynamic batch axis
    out = sess.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert not list(tmp_path.glob("*.tmp"))


def test_fake_quant_weights_stored_as_int8(tmp_path):
    torch.manual_seed(0)
    model = FakeQuantNet()
    float_model = FakeQuantNet(fake_quant=False)
    float_model.load_state_dict(model.state_dict())

    q = export_onnx(model, tmp_path / "q.onnx", input_shape=(1, 8, 8))
    f = export_onnx(float_model, tmp_path / "f.onnx", input_shape=(1, 8, 8))
    assert q.quantized and q.folded_weights == 2
    assert q.agreement >= 0.95
    assert q.bytes < 0.4 * f.bytes  # int8 weights: roughly a quarter of the float file

    proto = onnx.load(str(q.path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 1  # only the activation stays a runtime op
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    int8 = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert sorted(a.shape for a in int8) == [(10, 2048), (32, 1, 3, 3)]
    assert not any(a.dtype == np.float32 and a.size >= 288 for a in inits.values())
    # the stored integers are exactly round(w / s) per output channel
    expected = torch.clamp(torch.round(model.conv.weight / model.conv_scale.view(-1, 1, 1, 1)),
                           -128, 127).to(torch.int8).numpy()
    conv_q = next(a for a in int8 if a.ndim == 4)
    assert np.abs(conv_q.astype(int) - expected.astype(int)).max() <= 1


def test_quantize_linear_rounds_half_to_even_and_saturates():
    x = np.array([[0.5, 1.5, 2.5, -0.5], [100.0, -100.0, 3.0, 0.0]], np.float32)
    q = quantize_linear(x, np.array([1.0, 0.5], np.float32), np.array([0, 10], np.int8), axis=0)
    assert q.dtype == np.int8
    assert q.tolist() == [[0, 2, 2, 0], [127, -128, 16, 10]]
    u = quantize_linear(x, np.array(1.0, np.float32), np.array(128, np.uint8))
    assert u.dtype == np.uint8 and u[0].tolist() == [128, 130, 130, 128]


def test_unsupported_op_raises_export_error(tmp_path):
    class Spectral(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1].flatten(1)

    with pytest.raises(ExportError, match="linalg_svd"):
        export_onnx(Spectral(), tmp_path / "s.onnx", input_shape=(4, 4))
    assert not (tmp_path / "s.onnx").exists()


def test_traced_python_constant_fails_verification(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.flatten(1) * float(x.abs().max())  # frozen into the trace

    with pytest.raises(ExportError, match="max_abs_diff"):
        export_onnx(DataDependent(), tmp_path / "d.onnx", input_shape=(6,))


def test_a_branch_on_the_batch_size_is_named_not_excused_by_a_tolerance(tmp_path):
    class BatchBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.one, self.many = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            if x.shape[0] > 1:
                return self.many(x)
            return self.one(x)

    torch.manual_seed(0)
    with pytest.raises(ExportError) as caught:
        export_onnx(BatchBranch(), tmp_path / "b.onnx", input_shape=(6,))
    message = str(caught.value)
    assert "froze Python control flow at test_export.py:" in message
    assert "(`if x.shape[0] > 1:`)" in message and "atol" not in message
    assert not (tmp_path / "b.onnx").exists()


def test_bad_input_shape_and_samples(tmp_path):
    with pytest.raises(ExportError, match="input_shape"):
        export_onnx(nn.Linear(3, 2), tmp_path / "a.onnx", input_shape=(0, 3))
    with pytest.raises(ExportError, match="sample_inputs"):
        export_onnx(nn.Linear(3, 2), tmp_path / "a.onnx", input_shape=(3,),
                    sample_inputs=torch.zeros(4, 5))


def test_fold_handles_constant_nodes_and_default_zero_point():
    from onnx import TensorProto, helper

    from lighten.export import fold_quantized_weights

    w = np.array([[0.1, -0.2], [0.35, 0.04]], np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Constant", [], ["s"], value_float=0.1),
        helper.make_node("QuantizeLinear", ["w", "s"], ["wq"]),  # zero point omitted: uint8
        helper.make_node("DequantizeLinear", ["wq", "s"], ["wd"]),
        helper.make_node("MatMul", ["input", "wd"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fold_quantized_weights(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Constant", "DequantizeLinear", "MatMul"]
    (init,) = proto.graph.initializer
    q = numpy_helper.to_array(init)
    assert init.name == "wq" and q.dtype == np.uint8 and q.tolist() == [[1, 0], [4, 0]]
    onnx.checker.check_model(proto)
