"""QAT at 8/4/2 bits under plain SGD with momentum and weight decay: scales stay positive,
accuracy stays far above chance, the converted model runs on ONNX Runtime."""

import copy

import pytest
import torch
from torch import nn

from lighten.quant.lsq import LearnedFakeQuant
from lighten.quant.qat import QATConfig, QATLayer, convert_qat, prepare_qat
from lighten.quant.quantizer import QuantSpec
from lighten.step import FinetuneConfig
from lighten.training import TrainConfig, train

torch.set_num_threads(1)


def test_lsq_scale_stays_positive_under_large_sgd_steps():
    """A raw scale of 1e-3 takes an absolute SGD step of ~3.6 here and turns negative; the
    learned log-scale takes relative steps and stays a valid (positive, finite) scale."""
    spec = QuantSpec(bits=8, symmetric=True, signed=True)
    q = LearnedFakeQuant(spec, torch.tensor(1e-3), torch.tensor(0, dtype=torch.int32))
    x = torch.full((1000,), 5.0)  # all clipped at qmax: dL/ds = qmax * g * 1000 > 0
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        opt.zero_grad()
        q(x).sum().backward()
        opt.step()
        s = float(q.scale.detach())
        assert 0 < s < 1e-3  # moved down, but stays a scale


def test_train_keeps_weight_decay_off_learned_scales():
    spec = QuantSpec(bits=4, symmetric=True, signed=True)
    model = nn.Module()
    model.q = LearnedFakeQuant(spec, torch.tensor(0.05), torch.tensor(0, dtype=torch.int32))
    model.lin = nn.Linear(4, 2)
    model.forward = lambda x: model.lin(model.q(x))
    ds = torch.utils.data.TensorDataset(torch.zeros(64, 4), torch.zeros(64, dtype=torch.long))
    train(model, ds, TrainConfig(epochs=3, lr=0.1, batch_size=16, optimizer="sgd",
                                 weight_decay=0.5), progress=False)
    # zero inputs: the scale gets no gradient, so only decay could have moved it
    assert float(model.q.scale.detach()) == pytest.approx(0.05, rel=1e-6)


def test_state_dict_with_a_raw_scale_still_loads():
    """Training checkpoints written before the log-scale held ``scale`` itself."""
    spec = QuantSpec(bits=4, symmetric=True, signed=True)
    q = LearnedFakeQuant(spec, torch.ones(3), torch.zeros(3, dtype=torch.int32))
    q.load_state_dict({"scale": torch.tensor([0.1, 0.2, 0.4]),
                       "zero_point": torch.zeros(3, dtype=torch.int32)})
    assert torch.allclose(q.scale.detach(), torch.tensor([0.1, 0.2, 0.4]))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(self.stem(x)))), 1))


def _data(n, seed):
    """Four classes told apart by where a bright blob sits (a task a tiny conv net learns)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, r * 4:r * 4 + 4, col * 4:col * 4 + 4] += 1.5
    return torch.utils.data.TensorDataset(x, y)


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    model = TinyNet()
    train(model, _data(1024, 0), TrainConfig(epochs=3, lr=0.05, batch_size=32, optimizer="sgd",
                                             momentum=0.9), progress=False)
    return model.eval()


def _accuracy(logits, ds):
    return float((torch.as_tensor(logits).argmax(1) == ds.tensors[1]).float().mean())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("lsq", [True, False])
def test_qat_finetune_with_sgd_momentum_and_decay_stays_accurate(float_model, bits, lsq,
                                                                 tmp_path):
    import onnxruntime as ort

    from lighten.export import export_onnx

    train_ds, test_ds = _data(1024, 1), _data(512, 2)
    with torch.no_grad():
        assert _accuracy(float_model(test_ds.tensors[0]), test_ds) > 0.9
    cfg = QATConfig(weight_bits=bits, activation_bits=8, lsq=lsq,
                    finetune=FinetuneConfig(epochs=1))
    qat = prepare_qat(copy.deepcopy(float_model), list(train_ds.tensors[0][:256].split(64)), cfg)
    train(qat, train_ds, TrainConfig(epochs=2, lr=0.05, batch_size=32, optimizer="sgd",
                                     momentum=0.9, weight_decay=5e-4, schedule="cosine"),
          progress=False)
    for m in qat.modules():
        if isinstance(m, LearnedFakeQuant):
            assert torch.isfinite(m.scale).all() and (m.scale > 0).all()
    stem = qat.stem[0]
    assert isinstance(stem, QATLayer)
    w_over_s = stem.layer.weight.abs().amax((1, 2, 3)) / stem.weight_quant.scale.detach()
    assert (w_over_s < 4 * stem.weight_quant.qmax).all()  # the grid still spans the weights
    q = convert_qat(qat)
    x = test_ds.tensors[0]
    with torch.no_grad():
        assert _accuracy(q(x), test_ds) > 0.75  # chance is 0.25
    path = export_onnx(q, tmp_path / "q.onnx", input_shape=(1, 8, 8), verify=False).path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert _accuracy(out, test_ds) > 0.75
