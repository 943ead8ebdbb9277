"""Dynamic computation: models that do less work for easy inputs, and really skip it when
deployed. ``dynamic.early_exit`` (exits.py, early_exit.py, calibrate.py, runtime.py) and
``dynamic.gating`` (gating.py), ``dynamic.slimmable``
(slimmable.py, slimmable_layers.py)."""

from lighten.dynamic.any_precision import AnyPrecisionModel  # dynamic.any_precision
from lighten.dynamic.exits import MultiExitModel, confidence, module_chain
from lighten.dynamic.gating import GatedModel  # its artifact key names this package
from lighten.dynamic.slimmable import SlimmableModel  # with its layers (slimmable_layers)

__all__ = ["AnyPrecisionModel", "GatedModel", "MultiExitModel", "SlimmableModel", "confidence",
           "module_chain"]
