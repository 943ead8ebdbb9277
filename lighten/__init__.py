"""lighten: make trained PyTorch models lighter, and prove it with measurements.

The public API is re-exported lazily so ``import lighten`` stays fast and does not import
ONNX Runtime or matplotlib.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "lighten.recipe",
    "parse_recipe": "lighten.recipe",
    "run_recipe": "lighten.runner",
    "compress": "lighten.verb",
    "Report": "lighten.verb",
    "load_data": "lighten.data",
    "build_model": "lighten.models",
    "load_weights": "lighten.models",
    "train": "lighten.training",
    "evaluate": "lighten.training",
    "TrainConfig": "lighten.training",
    "save_artifact": "lighten.artifact",
    "load_artifact": "lighten.artifact",
    "export_onnx": "lighten.export",
    "get_backend": "lighten.backends",
    "MagnitudePruneConfig": "lighten.prune",
    "prune_magnitude_": "lighten.prune",
    "PTQConfig": "lighten.quant",
    "fold_batchnorm": "lighten.arch.fold",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lighten' has no attribute {name!r}")
