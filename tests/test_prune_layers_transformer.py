"""prune.layers on pre-norm transformer blocks: ``x + attn(norm(x)) + mlp(norm(x + ...))``."""

from __future__ import annotations

import torch
from torch import nn

from lighten.prune.layers import LayerPruneConfig, find_residual_blocks, prune_layers_


class PreNorm(nn.Module):
    def __init__(self, d: int, scale: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        with torch.no_grad():  # how much this block adds to the residual stream
            self.attn.out_proj.weight.mul_(scale)
            self.mlp[2].weight.mul_(scale)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_the_block_adding_least_to_the_stream_is_removed():
    torch.manual_seed(0)
    model = nn.Sequential(PreNorm(8, 1.0), PreNorm(8, 0.01), PreNorm(8, 1.0)).eval()
    x = torch.randn(4, 5, 8)
    blocks, _ = find_residual_blocks(model, x)
    assert [(b.path, b.summed) for b in blocks] == [("0", True), ("1", True), ("2", True)]
    expected = nn.Sequential(model[0], model[2])(x)
    batches = [(x, torch.zeros(4, dtype=torch.long))]
    report = prune_layers_(model, LayerPruneConfig(count=1), x, batches=lambda: batches)
    assert report.removed == ["1"] and isinstance(model[1], nn.Identity)
    assert report.params_after < report.params_before
    torch.testing.assert_close(model(x), expected)
