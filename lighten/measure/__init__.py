"""What lighten measures about a model: size, compute, energy, speed, accuracy, robustness.

One small module per job; this package re-exports the public functions. Nothing here imports
ONNX Runtime or matplotlib.
"""

from lighten.measure.energy import EnergyEstimate, energy_estimate, mac_pj
from lighten.measure.latency import median_latency_ms
from lighten.measure.macs import count_macs, count_macs_by_module
from lighten.measure.metrics import accuracy, agreement, macro_f1, recall_per_class
from lighten.measure.params import count_params, weight_tensors
from lighten.measure.robust import robustness, shift_rotate
from lighten.measure.stage import measure_stage, predict_compiled
from lighten.measure.timing import LatencyStats, Timing, time_interleaved

__all__ = [
    "EnergyEstimate",
    "LatencyStats",
    "Timing",
    "accuracy",
    "agreement",
    "count_macs",
    "count_macs_by_module",
    "count_params",
    "energy_estimate",
    "mac_pj",
    "macro_f1",
    "measure_stage",
    "median_latency_ms",
    "predict_compiled",
    "recall_per_class",
    "robustness",
    "shift_rotate",
    "time_interleaved",
    "weight_tensors",
]
