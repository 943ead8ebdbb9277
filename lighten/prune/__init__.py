"""Pruning: remove weights (unstructured, masks stored sparsely) or structure (later issues)."""

from lighten.prune.magnitude import MagnitudePruneConfig, magnitude_masks, prune_magnitude_

__all__ = ["MagnitudePruneConfig", "magnitude_masks", "prune_magnitude_"]
