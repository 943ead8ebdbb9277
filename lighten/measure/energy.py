"""Energy per inference, estimated from MACs and memory traffic at each layer's stored bit width.

Numbers from M. Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014, 45 nm, 0.9 V:

    =========================  ==========
    operation                  energy, pJ
    =========================  ==========
    8-bit int add              0.03
    32-bit int add             0.1
    8-bit int mult             0.2
    32-bit int mult            3.1
    32-bit float add           0.9
    32-bit float mult          3.7
    SRAM read, 64 bit, 8 KB    10
    SRAM read, 64 bit, 32 KB   20
    SRAM read, 64 bit, 1 MB    100
    DRAM read, 64 bit          1300-2600
    =========================  ==========

The model (simple on purpose; every choice is stated):

* Compute: every MAC of a layer costs one multiply and one add. A layer computes in integers
  only when both its ``weight_bits`` and ``activation_bits`` are <= 16 (a weight-only quantized
  layer dequantizes and computes in float). An integer multiply of b bits costs
  0.2 pJ * (b/8)^2 (multiplier area grows with the square of the width: 8 bit -> 0.2 pJ,
  32 bit -> 3.2 pJ vs. 3.1 measured), b = max(weight_bits, activation_bits); the add is the
  32-bit integer accumulator (0.1 pJ). Float layers pay 3.7 + 0.9 pJ per MAC.
* Weights are read once per inference from DRAM (1300 pJ per 64 bits, the low end of the
  range), at ``weight_bits``; biases at 32 bit.
* Activations: each weighted layer reads its input and writes its output once through a 32 KB
  SRAM (20 pJ per 64 bits) at ``activation_bits``.
* MACs outside weighted layers (e.g. an activation-activation matmul) are priced as fp32 compute.
* ``sparse_pj`` skips the MACs of zero weights (as a sparse kernel would); memory is unchanged.
  ``pj_per_inference`` is the dense figure: lighten's runtimes execute pruned weights densely.

Bit widths are read from each module that stores a weight (``weight*`` Parameters, or integer
``weight*_int*`` buffers): a quantized module's own facts (``quant_facts``; dynamic activations
count as 8 bit, weight-only layers compute in float), else its ``weight_bits`` and
``activation_bits``, 32 when missing or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lighten.measure.macs import count_macs_by_module
from lighten.measure.params import stored_weights

FP32_MULT_PJ = 3.7
FP32_ADD_PJ = 0.9
INT8_MULT_PJ = 0.2
INT32_ADD_PJ = 0.1
DRAM_PJ_PER_64BIT = 1300.0
SRAM_PJ_PER_64BIT = 20.0
INTEGER_MAX_BITS = 16


@dataclass
class EnergyEstimate:
    pj_per_inference: float  # dense execution
    breakdown: dict[str, float]  # compute_pj, weight_memory_pj, activation_memory_pj, other_pj
    sparse_pj: float = 0.0  # zero-weight MACs skipped
    layers: list[dict] = field(default_factory=list)  # per weighted layer: name, macs, bits, pj

    @property
    def uj_per_inference(self) -> float:
        return self.pj_per_inference * 1e-6


def mac_pj(weight_bits: int, activation_bits: int) -> float:
    """Energy of one multiply-accumulate at the given stored widths."""
    if weight_bits <= INTEGER_MAX_BITS and activation_bits <= INTEGER_MAX_BITS:
        bits = max(weight_bits, activation_bits)
        return INT8_MULT_PJ * (bits / 8) ** 2 + INT32_ADD_PJ
    return FP32_MULT_PJ + FP32_ADD_PJ


def _bits(module: nn.Module) -> tuple[int, int]:
    """(weight bits, activation bits) the module stores and computes at: a quantized module's
    own facts (dynamic activations are int8 at run time; weight-only layers compute in float),
    else its ``weight_bits`` / ``activation_bits`` attributes, else 32."""
    from lighten.quant.layer_report import quant_facts

    facts = quant_facts(module)
    if facts is None:
        return (int(getattr(module, "weight_bits", None) or 32),
                int(getattr(module, "activation_bits", None) or 32))
    acts = facts.activation_bits
    return (int(facts.weight_bits or 32),
            8 if acts == "dynamic" else 32 if isinstance(acts, str) else int(acts))


def energy_estimate(model: nn.Module, input_shape) -> EnergyEstimate:
    """Estimate energy of one inference at batch 1 (see the module docstring for the model)."""
    weighted = {name: m for name, m in model.named_modules() if stored_weights(m)}
    io_numel: dict[str, int] = {}

    def hook(name):
        def record(_module, inputs, output):
            numel = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
            if isinstance(output, torch.Tensor):
                numel += output.numel()
            io_numel[name] = io_numel.get(name, 0) + numel
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in weighted.items()]
    try:
        macs = count_macs_by_module(model, input_shape)
    finally:
        for h in handles:
            h.remove()

    own = _own_macs(weighted, macs)
    layers = []
    for name, module in weighted.items():
        wb, ab = _bits(module)
        weights = stored_weights(module)
        numel = sum(w.numel() for w in weights)
        biases = sum(b.numel() for n, b in module.named_parameters(recurse=False)
                     if n.startswith("bias"))
        density = sum(int(torch.count_nonzero(w.detach())) for w in weights) / max(1, numel)
        weight_bits_total = numel * wb + biases * 32
        compute = own[name] * mac_pj(wb, ab)
        layers.append({
            "name": name, "macs": own[name], "weight_bits": wb, "activation_bits": ab,
            "density": density, "compute_pj": compute,
            "weight_memory_pj": weight_bits_total / 64 * DRAM_PJ_PER_64BIT,
            "activation_memory_pj": io_numel.get(name, 0) * ab / 64 * SRAM_PJ_PER_64BIT,
        })
    other_macs = macs.get("", 0) - sum(own.values())
    breakdown = {
        "compute_pj": sum(layer["compute_pj"] for layer in layers),
        "weight_memory_pj": sum(layer["weight_memory_pj"] for layer in layers),
        "activation_memory_pj": sum(layer["activation_memory_pj"] for layer in layers),
        "other_compute_pj": max(0, other_macs) * (FP32_MULT_PJ + FP32_ADD_PJ),
    }
    dense = sum(breakdown.values())
    skipped = sum(layer["compute_pj"] * (1 - layer["density"]) for layer in layers)
    return EnergyEstimate(dense, breakdown, dense - skipped, layers)


def _own_macs(weighted: dict[str, nn.Module], macs: dict[str, int]) -> dict[str, int]:
    """MACs of each weighted module minus those of weighted modules nested inside it."""
    own: dict[str, int] = {}
    for name in sorted(weighted, key=lambda n: -n.count(".") - (n != "")):
        inner = [d for d in own if name == "" or d.startswith(name + ".")]
        own[name] = max(0, macs.get(name, 0) - sum(own[d] for d in inner))
    return own
