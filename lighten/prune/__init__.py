"""Pruning: zero weights (unstructured, N:M, L1; stored sparsely) or remove structure physically."""

from lighten.prune.heads import HeadPruneConfig, prune_heads_
from lighten.prune.l1 import L1PruneConfig, prune_l1_
from lighten.prune.layers import LayerPruneConfig, prune_layers_
from lighten.prune.magnitude import MagnitudePruneConfig, magnitude_masks, prune_magnitude_
from lighten.prune.nm import NMPruneConfig, nm_mask, prune_nm_
from lighten.prune.sensitivity import SensitivityTable, analyze, derive_ratios
from lighten.prune.structured import (
    ChannelPruneConfig,
    NeuronPruneConfig,
    prune_channels_,
)

__all__ = [
    "ChannelPruneConfig", "L1PruneConfig", "MagnitudePruneConfig", "NMPruneConfig",
    "NeuronPruneConfig", "SensitivityTable", "analyze", "derive_ratios", "magnitude_masks",
    "nm_mask", "prune_channels_", "prune_l1_", "prune_magnitude_", "prune_nm_",
    "HeadPruneConfig", "LayerPruneConfig", "prune_heads_", "prune_layers_",
]
