"""Conv1d (and Conv3d) as first-class static int8 layers: BN folded, per-channel int8 weights,
calibrated activations, QDQ export that ONNX Runtime runs as QLinearConv, artifact round trip,
quant.qat / quant.mixed, the torch int8 backend, the layer report and a recipe end to end."""

from __future__ import annotations

import copy
import inspect
import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.backends.onnxrt import OnnxRuntimeBackend
from lighten.export import export_onnx
from lighten.modules import get_module_type, registered_key
from lighten.quant import (
    PTQConfig,
    QuantConv,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantLinear,
    quantize,
    to_torch_int8,
)
from lighten.quant.layer_report import layer_table
from lighten.quant.quantizer import sqnr_db

SHAPE = (4, 32)


class SeqNet(nn.Module):
    """(Conv1d + BN1d + ReLU) x 2, global average pool, Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # BN that really rescales, so folding matters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _float(factory=SeqNet):
    torch.manual_seed(0)
    return _randomize_bn(factory())


def _data(n, seed, shape=SHAPE):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _calib(shape=SHAPE):
    return list(_data(256, 0, shape).split(64))


def _optimized_ops(model, tmp_path, shape=SHAPE) -> dict[str, int]:
    """Op types in the graph ONNX Runtime really executes (the backend's own record)."""
    compiled = OnnxRuntimeBackend(threads=1).compile(
        model, input_shape=shape, workdir=tmp_path, sample_inputs=_data(32, 5, shape))
    return compiled.info["op_types"]


@pytest.fixture(scope="module")
def pair():
    f = _float()
    notes: list[str] = []
    q = quantize(copy.deepcopy(f), _calib(), PTQConfig(), notes=notes)
    assert not any("left in float" in n for n in notes), notes
    return f, q


def test_ptq_quantizes_every_conv1d_with_bn_folded(pair):
    f, q = pair
    assert isinstance(q.conv1, QuantConv1d) and isinstance(q.conv2, QuantConv1d)
    assert isinstance(q.conv1, QuantConv) and isinstance(q.fc, QuantLinear)
    assert isinstance(q.bn1, nn.Identity) and isinstance(q.bn2, nn.Identity)  # folded
    assert isinstance(q.relu1, nn.Identity) and q.conv1.activation == "relu"  # absorbed
    assert q.conv1.weight_int.dtype == torch.int8 and q.conv1.weight_int.shape == (8, 4, 3)
    assert q.conv1.weight_scale.shape == (8,)  # per output channel
    assert float(q.conv1.act_scale) != 1.0 and float(q.conv1.out_scale) != 1.0  # calibrated
    assert float(q.conv2.act_scale) == float(q.conv1.out_scale)  # reuses conv1's output grid
    assert q.fc.output_quant is False
    x = _data(512, 1)  # held out
    with torch.no_grad():
        ref, out = f(x), q(x)
    assert sqnr_db(ref, out) > 25
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95


def test_onnx_matches_pytorch_and_ort_runs_integer_convs(pair, tmp_path):
    import onnxruntime as ort

    _, q = pair
    x = _data(64, 2)
    check = export_onnx(q, tmp_path / "m.onnx", input_shape=SHAPE, sample_inputs=x)
    assert check.quantized and check.agreement >= 0.95
    sess = ort.InferenceSession(str(check.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = q(x).numpy()
    out = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref).max() <= 0.05 * max(1.0, float(np.abs(ref).max()))
    stored = [i for i in onnx.load(str(check.path)).graph.initializer
              if i.data_type == onnx.TensorProto.INT8]
    assert {tuple(i.dims) for i in stored} >= {(8, 4, 3), (8, 8, 3)}  # int8 conv weights

    ops = _optimized_ops(q, tmp_path / "ort")
    assert ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0) == 2
    assert ops.get("Conv", 0) == 0 and ops.get("FusedConv", 0) == 0  # no float conv left
    assert ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0) == 1


def test_artifact_round_trip_is_identical(pair, tmp_path):
    _, q = pair
    source = inspect.getsource(SeqNet)
    (tmp_path / "net.py").write_text(f"import torch\nfrom torch import nn\n\n\n{source}\n\n"
                                     "def seq_net():\n    return SeqNet()\n")
    spec = {"python": f"{tmp_path / 'net.py'}:seq_net", "input_shape": list(SHAPE)}
    path = tmp_path / "q.safetensors"
    save_artifact(q, path, model_spec=spec, input_shape=SHAPE, num_classes=4)
    loaded, manifest = load_artifact(path)  # the float net built from the spec, then swapped
    assert type(loaded.conv1) is QuantConv1d and type(loaded.bn1) is nn.Identity
    types = {m["path"]: m["type"] for m in manifest["edits"] if "type" in m}
    assert types["conv1"] == "lighten.quant.modules:QuantConv1d"
    x = _data(32, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_old_quantconv2d_artifacts_still_load():
    # the exact key and config a QuantConv2d artifact stored before QuantConv existed
    cls = get_module_type("lighten.quant.modules:QuantConv2d")
    assert cls is QuantConv2d and issubclass(cls, QuantConv)
    config = {"in_channels": 2, "out_channels": 3, "kernel_size": [3, 3], "stride": [1, 1],
              "padding": [1, 1], "dilation": [1, 1], "groups": 1, "bias": True,
              "weight_bits": 8, "activation_bits": 8, "per_channel": True, "symmetric": True,
              "reduce_range": False, "act_signed": False, "activation": "relu",
              "output_quant": True}
    layer = cls.from_artifact(config)
    assert layer.weight_int.shape == (3, 2, 3, 3)
    assert json.loads(json.dumps(layer.artifact_config())) == config
    assert registered_key(layer) == "lighten.quant.modules:QuantConv2d"
    assert type(QuantConv.from_float(nn.Conv2d(2, 3, 3))) is QuantConv2d
    with pytest.raises(TypeError, match="abstract"):
        QuantConv(2, 3, 3)
    with pytest.raises(TypeError, match="3-d conv"):
        QuantConv3d.from_float(nn.Conv1d(2, 3, 3))


def test_torch_backend_converts_conv1d(pair):
    _, q = pair
    t = to_torch_int8(q)
    assert isinstance(t.conv1.qlayer, torch.ao.nn.quantized.Conv1d)
    x = _data(128, 4)
    with torch.no_grad():
        ref, out = q(x), t(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95
    assert (ref - out).abs().max() < 4 * float(q.fc.out_scale)
    q_torch = quantize(_float(), _calib(), PTQConfig(backend="torch"))  # checks conversion
    assert isinstance(q_torch.conv2, QuantConv1d) and q_torch.conv2.act_signed is False


def test_layer_report_lists_conv1d(pair):
    f, q = pair
    table = layer_table(f, q, [_data(64, 6)])
    rows = {r.name: r for r in table.rows}
    assert rows["conv1"].kind == "QuantConv1d" and rows["conv2"].kind == "QuantConv1d"
    assert rows["conv1"].compared_with == "conv1 + bn1 (folded) + relu"
    assert rows["conv1"].granularity == "per-channel" and rows["conv1"].sqnr_db > 25


def test_qat_trains_and_converts_conv1d(tmp_path):
    from lighten.quant.qat import QATConfig, QATLayer, convert_qat, prepare_qat
    from lighten.step import FinetuneConfig
    from lighten.training import TrainConfig, train

    model = _float()
    x = _data(128, 0)
    cfg = QATConfig(weight_bits=4, finetune=FinetuneConfig(epochs=1))
    qat = prepare_qat(copy.deepcopy(model), list(x.split(64)), cfg)
    assert isinstance(qat.conv1, QATLayer) and isinstance(qat.bn1, nn.Identity)
    ds = torch.utils.data.TensorDataset(x, model(x).argmax(1))
    train(qat, ds, TrainConfig(epochs=1, lr=1e-3, batch_size=32), progress=False)
    test = _data(64, 1)
    with torch.no_grad():
        before = qat.eval()(test)
        q = convert_qat(qat)
        after = q(test)
    assert isinstance(q.conv1, QuantConv1d) and q.conv1.weight_bits == 4
    assert int(q.conv1.weight_int.abs().max()) <= 7
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    check = export_onnx(q, tmp_path / "qat.onnx", input_shape=SHAPE, sample_inputs=test)
    assert check.agreement >= 0.95


def test_mixed_chooses_bits_for_conv1d():
    from lighten.quant.mixed import MixedConfig, quantize_mixed_

    q, bits = quantize_mixed_(_float(), _calib(), MixedConfig(budget_bytes=0.2))
    assert set(bits) == {"conv1", "conv2", "fc"}
    for name, b in bits.items():
        layer = q.get_submodule(name)
        assert isinstance(layer, (QuantConv1d, QuantLinear)) and layer.weight_bits == b


class GeneralConv1d(nn.Module):
    """Strides, padding, dilation, a depthwise conv, bias=False, MaxPool1d, ReLU6, a residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2, bias=False),
                                  nn.BatchNorm1d(8), nn.ReLU6())
        self.dw = nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.pw = nn.Conv1d(8, 8, 1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(8 * 8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + self.pw(torch.relu(self.dw(x))))
        return self.fc(self.pool(x).flatten(1))


def test_general_conv1d_layers_run_on_integer_kernels(tmp_path):
    f = _float(GeneralConv1d)
    notes: list[str] = []
    q = quantize(copy.deepcopy(f), _calib(), PTQConfig(), notes=notes)
    assert not any("left in float" in n for n in notes), notes
    assert all(isinstance(q.get_submodule(n), QuantConv1d) for n in ("stem.0", "dw", "pw"))
    assert q.get_submodule("stem.0").activation == "relu6"
    x = _data(256, 1)
    with torch.no_grad():
        assert sqnr_db(f(x), q(x)) > 20
    ops = _optimized_ops(q, tmp_path)
    assert ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0) == 3
    assert ops.get("Conv", 0) == 0 and ops.get("QLinearAdd", 0) == 1


def test_conv3d_is_quantized_exported_and_converted(tmp_path):
    shape = (2, 6, 6, 6)

    def net():
        return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                             nn.MaxPool3d(2), nn.Conv3d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8, 4))

    f = _float(net)
    q = quantize(copy.deepcopy(f), _calib(shape), PTQConfig())
    assert isinstance(q[0], QuantConv3d) and isinstance(q[4], QuantConv3d)
    x = _data(128, 1, shape)
    with torch.no_grad():
        assert sqnr_db(f(x), q(x)) > 20
    ops = _optimized_ops(q, tmp_path, shape)
    assert ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0) == 2 and ops.get("Conv", 0) == 0
    t = to_torch_int8(q)
    assert isinstance(t[0].qlayer, torch.ao.nn.quantized.Conv3d)
    with torch.no_grad():
        assert (t(x).argmax(1) == q(x).argmax(1)).float().mean() >= 0.95


def test_unsupported_convs_stay_float_with_a_note():
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.ConvTranspose1d(8, 4, 2, stride=2), nn.Flatten(),
                          nn.Linear(4 * 64, 4)).eval()
    notes: list[str] = []
    q = quantize(model, _calib(), PTQConfig(), notes=notes)
    assert type(q[0]) is nn.Conv1d and type(q[2]) is nn.ConvTranspose1d
    assert isinstance(q[4], QuantLinear)
    assert any(n.startswith("0 left in float: padding_mode='circular'") for n in notes)
    assert any(n.startswith("2 left in float: ConvTranspose1d") for n in notes)


MODELS = '''
import torch
from torch import nn


class SeqNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def seq_net():
    return SeqNet()
'''


def test_recipe_runs_quant_ptq_on_a_sequence_model(tmp_path, monkeypatch):
    import onnxruntime as ort

    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "models.py").write_text(MODELS)
    out = tmp_path / "out"
    recipe = tmp_path / "seq.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: seq
        model: {{python: models.py:seq_net, input_shape: [4, 32]}}
        data: {{name: synthetic, samples: 256, input_shape: [4, 32], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - quant.ptq: {{calib_samples: 64}}
    """))
    result = run_recipe(load_recipe(recipe), progress=False)
    final = result.rows[-1]
    assert final["stage"] == "quant.ptq" and final["bytes"] > 0
    assert not any("left in float" in n for n in result.notes), result.notes
    assert any("quant.ptq: 3 layers int8" in n for n in result.notes), result.notes

    model, _ = load_artifact(out / "stages" / "01-quant.ptq.safetensors")
    assert isinstance(model.features[0], QuantConv1d) and isinstance(model.head, QuantLinear)
    deploy = out / "deploy" / "quant.ptq"
    graph = onnx.load(str(deploy / "model.optimized.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops
    x = _data(32, 1)
    with torch.no_grad():
        reloaded = model(x).numpy()
    session = ort.InferenceSession(str(deploy / "model.onnx"), providers=["CPUExecutionProvider"])
    deployed = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(reloaded - deployed).max() <= 0.1 * max(1.0, float(np.abs(deployed).max()))
    assert (reloaded.argmax(1) == deployed.argmax(1)).mean() >= 0.9
