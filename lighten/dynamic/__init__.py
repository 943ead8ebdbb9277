"""Dynamic computation: models that do less work for easy inputs, and really skip it when
deployed. ``dynamic.early_exit`` (exits.py, early_exit.py, calibrate.py, runtime.py) and
``dynamic.gating`` (gating.py)."""

from lighten.dynamic.exits import MultiExitModel, confidence, module_chain
from lighten.dynamic.gating import GatedModel  # its artifact key names this package

__all__ = ["GatedModel", "MultiExitModel", "confidence", "module_chain"]
