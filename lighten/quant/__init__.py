"""Quantization: int8 math, range observers, quantized layers and the ``quant.ptq`` step.

Library use::

    from lighten.quant import PTQConfig, quantize
    quantize(model, calibration_batches, PTQConfig(bits=8, calibration="percentile"))
"""

from __future__ import annotations

from torch import nn

from lighten.quant.modules import QuantAct, QuantConv2d, QuantLinear
from lighten.quant.ptq import PTQConfig, quantize_ptq_
from lighten.quant.torch_int8 import TorchInt8Layer, to_torch_int8

quantize = quantize_ptq_  # the library verb: quantize(model, batches, PTQConfig(...)) -> model


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` holds int8 weights (fake-quant or PyTorch int8 form)."""
    return any(isinstance(m, (QuantConv2d, QuantLinear, TorchInt8Layer)) for m in model.modules())


__all__ = ["PTQConfig", "QuantAct", "QuantConv2d", "QuantLinear", "is_quantized", "quantize",
           "quantize_ptq_", "to_torch_int8"]
