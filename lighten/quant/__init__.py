"""Quantization: int8 math, range observers, quantized layers and the ``quant.ptq`` step.

Library use::

    from lighten.quant import PTQConfig, quantize
    quantize(model, calibration_batches, PTQConfig(bits=8, calibration="percentile"))
"""

from __future__ import annotations

from torch import nn

from lighten.quant.modules import (
    QuantAct,
    QuantConv,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantLinear,
    _QuantLayer,
)
from lighten.quant.ptq import PTQConfig, quantize_ptq_
from lighten.quant.torch_int8 import TorchInt8Layer, to_torch_int8

quantize = quantize_ptq_  # the library verb: quantize(model, batches, PTQConfig(...)) -> model


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` holds int8 weights (fake-quant or PyTorch int8 form)."""
    return any(isinstance(m, (_QuantLayer, TorchInt8Layer)) for m in model.modules())


__all__ = ["PTQConfig", "QuantAct", "QuantConv", "QuantConv1d", "QuantConv2d", "QuantConv3d",
           "QuantLinear", "is_quantized", "quantize", "quantize_ptq_", "to_torch_int8"]

# quantization-aware training (LSQ) and mixed precision
from lighten.quant.mixed import MixedConfig, quantize_mixed_  # noqa: E402
from lighten.quant.qat import QATConfig, convert_qat, prepare_qat  # noqa: E402

__all__ += ["MixedConfig", "QATConfig", "convert_qat", "prepare_qat", "quantize_mixed_"]

# dynamic quantization and weight-only low-bit quantization
from lighten.quant.dynamic import DynamicConfig, DynamicQuantLinear, quantize_dynamic_  # noqa: E402
from lighten.quant.weight_only import (  # noqa: E402
    WeightOnlyConfig,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    quantize_weight_only_,
)

__all__ += ["DynamicConfig", "DynamicQuantLinear", "WeightOnlyConfig", "WeightOnlyConv2d",
            "WeightOnlyLinear", "quantize_dynamic_", "quantize_weight_only_"]
