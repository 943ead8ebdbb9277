"""QAT: straight-through gradients, LSQ scale gradients, accuracy recovery, integer conversion."""

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lighten.quant import PTQConfig, QuantAct, QuantConv2d, QuantLinear, quantize
from lighten.quant.lsq import LearnedFakeQuant, fake_quant_ste, lsq_gradient_scale
from lighten.quant.qat import QATAct, QATConfig, QATLayer, convert_qat, prepare_qat
from lighten.quant.quantizer import QuantSpec
from lighten.step import FinetuneConfig, StepContext
from lighten.training import TrainConfig, evaluate, train

torch.set_num_threads(1)

# ---------------------------------------------------------------- estimator math


def test_ste_gradient_is_identity_inside_and_zero_outside():
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    y = fake_quant_ste(x, scale, zp, -7, 7)  # representable range [-0.7, 0.7]
    assert torch.allclose(y, torch.clamp(torch.round(x / 0.1), -7, 7) * 0.1)
    y.sum().backward()
    inside = x.detach().abs() < 0.7 - 1e-4
    outside = x.detach().abs() > 0.7 + 1e-4
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum())))


def test_lsq_scale_gradient_matches_paper_and_scale_moves():
    spec = QuantSpec(bits=4, symmetric=False, signed=False)  # [0, 15]
    x = torch.tensor([[-1.0, 0.13, 0.52, 0.77, 5.0]])
    q = LearnedFakeQuant(spec, torch.tensor(0.1), torch.tensor(2, dtype=torch.int32),
                         learn=True, batched=True)
    q(x).sum().backward()
    v = x / 0.1
    inside = torch.where(v + 2 < 0, torch.tensor(0.0 - 2),  # below: qmin - z
                         torch.where(v + 2 > 15, torch.tensor(15.0 - 2),  # above: qmax - z
                                     torch.round(v) - v))  # inside: round(x/s) - x/s
    g = lsq_gradient_scale(x[0].numel(), 15)
    assert g == pytest.approx(1 / (5 * 15) ** 0.5)
    # the parameter is log s: d/d(log s) = s * d/ds
    assert float(q.log_scale.grad) / 0.1 == pytest.approx(g * float(inside.sum()), rel=1e-5)

    # the scale is learned: clipping a wide signal makes the loss pull the step size up
    torch.manual_seed(0)
    data = torch.randn(256, 16) * 3
    before = float(q.scale.detach())
    opt = torch.optim.Adam(q.parameters(), lr=0.01)
    for _ in range(50):
        opt.zero_grad()
        (q(data) - data).pow(2).mean().backward()
        opt.step()
    assert float(q.scale.detach()) > before * 1.5


def test_finetune_is_required():
    with pytest.raises(ValidationError, match="quant.qat is training"):
        QATConfig(weight_bits=4)
    with pytest.raises(ValidationError):
        QATConfig(weight_bits=9, finetune={"epochs": 1})


# ---------------------------------------------------------------- accuracy recovery


def _teacher_task(dim=32, classes=10):
    """Labels from a random linear teacher: small margins, so weight precision matters."""
    w = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))

    def draw(n, seed):
        x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        return torch.utils.data.TensorDataset(x, (x @ w.T).argmax(1))

    return draw(4096, 1), draw(2048, 2)


def _context(train_ds, test_ds, input_shape, classes, train_cfg=None):
    from lighten.data import DataBundle

    bundle = DataBundle("tiny", train_ds, test_ds, input_shape, classes)
    return StepContext(data=bundle, train_config=train_cfg or TrainConfig(batch_size=64),
                       baseline=None, workdir=None, progress=False)


def test_qat_4bit_recovers_accuracy_lost_by_4bit_ptq():
    from lighten.registry import get_step

    train_ds, test_ds = _teacher_task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    train(model, train_ds, TrainConfig(epochs=10, lr=3e-3, batch_size=64), progress=False)
    float_acc = evaluate(model, test_ds)
    calib = [train_ds.tensors[0][:512]]
    w4 = {"0": 4, "2": 4}  # PTQ with 4-bit weights and 8-bit activations, like the QAT below
    ptq = quantize(copy.deepcopy(model), calib, PTQConfig(per_channel=False), weight_bits=w4)
    ptq_acc = evaluate(ptq, test_ds)

    ctx = _context(train_ds, test_ds, (32,), 10)
    cfg = QATConfig(weight_bits=4, per_channel=False, calib_samples=512,
                    finetune=FinetuneConfig(epochs=3, lr=1e-3))
    qat = get_step("quant.qat").apply(copy.deepcopy(model), cfg, ctx)
    qat_acc = evaluate(qat, test_ds)

    assert ptq_acc < float_acc - 0.01  # 4-bit PTQ loses accuracy here ...
    assert qat_acc > ptq_acc + 0.008  # ... and QAT wins most of it back
    assert qat_acc > float_acc - 0.01
    for layer in (qat[0], qat[2]):
        assert isinstance(layer, QuantLinear) and layer.weight_bits == 4
        assert layer.weight_int.dtype == torch.int8
        assert -8 <= int(layer.weight_int.min()) and int(layer.weight_int.max()) <= 7
    assert qat[0].activation == "relu" and isinstance(qat[1], nn.Identity)
    assert any("quant.qat: 2 layers w4a8" in n for n in ctx.notes)


# ---------------------------------------------------------------- conversion and ONNX Runtime


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)
        return self.fc(torch.flatten(self.pool(out), 1))


def _images(n, seed):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lsq", [True, False])
def test_converted_model_matches_qat_model_and_onnx_runtime(lsq, tmp_path):
    from lighten.export import export_onnx

    torch.manual_seed(0)
    model = TinyResNet().eval()
    model.stem[1].running_var.uniform_(0.5, 2.0)
    x = _images(256, 0)
    labels = model(x).argmax(1)  # learnable targets: the float model's own decisions
    cfg = QATConfig(weight_bits=3, lsq=lsq, finetune=FinetuneConfig(epochs=1))
    qat = prepare_qat(copy.deepcopy(model), list(x.split(64)), cfg)
    assert isinstance(qat.stem[1], nn.Identity)  # BN folded before the quantizers
    assert isinstance(qat.conv1, QATLayer) and isinstance(qat.relu2, QATAct)
    assert qat.conv2.input_quant is None  # reuses conv1's output quantizer, as PTQ does
    scale0 = qat.conv1.weight_quant.scale.detach().clone()
    ds = torch.utils.data.TensorDataset(x, labels)
    train(qat, ds, TrainConfig(epochs=1, lr=1e-3, batch_size=32), progress=False)
    assert not torch.equal(qat.conv1.weight_quant.scale.detach(), scale0)  # learned or tracked

    test = _images(64, 1)
    with torch.no_grad():
        before = qat.eval()(test)
        conv1_out_scale = float(qat.conv1.output_quant.scale)
        q = convert_qat(qat)
        after = q(test)
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.relu2, QuantAct)
    assert isinstance(q.fc, QuantLinear) and q.fc.output_quant is False
    assert q.conv1.weight_bits == 3 and int(q.conv1.weight_int.abs().max()) <= 3
    assert float(q.conv2.act_scale) == conv1_out_scale
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert (after.argmax(1) == before.argmax(1)).float().mean() >= 0.95

    check = export_onnx(q, tmp_path / "qat.onnx", input_shape=(1, 12, 12), sample_inputs=test)
    assert check.agreement >= 0.95 and check.max_abs_diff < 0.1 * float(after.abs().max())
