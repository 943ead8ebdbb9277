"""Entropy coding of float32 tensors stored as float16 (``stored_dtype``): the ResNet-20 push
recipe (93% sparse, float16 BatchNorm) hit a byte plane of such a tensor that coded smaller,
and rebuilding it as float32 raised instead of round-tripping."""

import torch
from torch import nn

from lighten.artifact import ENTROPY_FLAG, load_artifact, save_artifact


def _halves() -> nn.Linear:
    """A layer of float32 weights that are all float16s: stored as float16, and the exponent
    byte of normal-distributed values codes smaller."""
    layer = nn.Linear(64, 64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 64, generator=g).half().float())
    return layer


def test_float16_stored_planes_round_trip(tmp_path):
    model = _halves()
    plain = save_artifact(model, tmp_path / "plain.safetensors", model_spec=None)
    setattr(model, ENTROPY_FLAG, True)
    coded = save_artifact(model, tmp_path / "coded.safetensors", model_spec=None)
    assert coded < plain  # the exponent plane was coded
    back, _ = load_artifact(tmp_path / "coded.safetensors", model=nn.Linear(64, 64))
    assert back.weight.dtype == torch.float32
    assert torch.equal(back.weight, model.weight)
