"""Parameter sharing (issue #11): weights stored once and referenced many times.

Steps: ``share.kmeans`` (weight clustering), ``share.pq`` (product quantization),
``share.channels`` (near-duplicate filters merged), ``share.tie`` (identical blocks tied).
Each lives in its own module, registered in :mod:`lighten.registry`; nothing is imported here so
``import lighten.share`` stays light.
"""
