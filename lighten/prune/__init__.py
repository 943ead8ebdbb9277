"""Pruning: remove weights (unstructured, masks stored sparsely) or structure (later issues)."""

from lighten.prune.l1 import L1PruneConfig, prune_l1_
from lighten.prune.magnitude import MagnitudePruneConfig, magnitude_masks, prune_magnitude_
from lighten.prune.nm import NMPruneConfig, nm_mask, prune_nm_
from lighten.prune.sensitivity import SensitivityTable, analyze, derive_ratios

__all__ = ["L1PruneConfig", "MagnitudePruneConfig", "NMPruneConfig", "SensitivityTable",
           "analyze", "derive_ratios", "magnitude_masks", "nm_mask", "prune_l1_",
           "prune_magnitude_", "prune_nm_"]
