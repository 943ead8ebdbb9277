import torch
from torch import nn

from lighten.quant import PTQConfig
from lighten.quant.modules import QuantConv2d, QuantLinear
from lighten.quant.ptq import quantize_ptq_


def test_weight_bits_override_gives_w4a8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    batches = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    quantize_ptq_(model, batches, PTQConfig(bits=8, weight_bits=4))
    layers = [m for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    assert len(layers) == 2
    for layer in layers:
        assert layer.weight_bits == 4 and layer.activation_bits == 8
        assert int(layer.weight_int.min()) >= -8 and int(layer.weight_int.max()) <= 7
        assert int(layer.weight_int.max()) == 7 or int(layer.weight_int.min()) == -8
