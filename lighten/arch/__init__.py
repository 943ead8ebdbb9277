"""Architecture surgery: BN folding (used by the quant steps), ``arch.fold`` (reorganize the
traced graph: fold, drop, merge, re-parameterize) and ``arch.separable`` (k x k convs ->
depthwise + pointwise) and ``arch.nas`` (architecture search under a MAC / params / bytes /
latency budget: nas.py, nas_space.py, nas_build.py, nas_latency.py, nas_search.py).

Library use::

    from lighten.arch import FoldConfig, SeparableConfig, reorganize_, separable_
    result = reorganize_(model, (example_batch,))          # in place; result.max_abs_diff
    choices = separable_(model, (example_batch,), SeparableConfig(measure_latency=False))
"""

from __future__ import annotations

import importlib

from lighten.arch.fold import FoldReport, fold_batchnorm, fold_batchnorm_report

_LAZY = {"FoldConfig": "lighten.arch.reorganize", "FoldResult": "lighten.arch.reorganize",
         "reorganize_": "lighten.arch.reorganize", "SeparableConfig": "lighten.arch.separable",
         "separable_": "lighten.arch.separable", "separable_pair": "lighten.arch.separable",
         "NASConfig": "lighten.arch.nas", "nas_": "lighten.arch.nas"}

__all__ = ["FoldReport", "fold_batchnorm", "fold_batchnorm_report", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:  # the step modules import the registry: loaded on first use
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lighten.arch' has no attribute {name!r}")
