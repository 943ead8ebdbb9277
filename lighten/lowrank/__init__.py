"""Low-rank factorization steps: ``lowrank.svd`` (Linear / 1x1 conv), ``lowrank.tucker``
(Tucker-2 of k x k convs) and ``lowrank.cp`` (CP of k x k convs).

Every replacement is an ``nn.Sequential`` of standard torch layers, so artifacts rebuild it from
the edit log and ONNX export needs nothing new; a layer is replaced only where its MACs fall and
(``measure_latency``, the default) where the replacement times faster on the deployment backend.
Shared machinery: :mod:`lighten.lowrank.common`; rank rules: :mod:`lighten.lowrank.ranks`.
"""

from lighten.lowrank.cp import CPConfig, cp_layer, factorize_cp_
from lighten.lowrank.ranks import energy_rank, evbmf_rank
from lighten.lowrank.svd import SVDConfig, factorize_svd_, svd_layer
from lighten.lowrank.tucker import TuckerConfig, factorize_tucker_, tucker2_layer

__all__ = ["CPConfig", "SVDConfig", "TuckerConfig", "cp_layer", "energy_rank", "evbmf_rank",
           "factorize_cp_", "factorize_svd_", "factorize_tucker_", "svd_layer", "tucker2_layer"]
