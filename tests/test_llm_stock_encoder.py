"""The llm.* steps that replace Linears (weight-only, SmoothQuant) on a language model built
from PyTorch's nn.TransformerEncoder: its fused layers read out_proj.weight directly, so they
are unfused first (a user's run: 'WeightOnlyLinear' object has no attribute 'weight')."""

from __future__ import annotations

import pytest
import torch
from _llm_common import write_text
from torch import nn

from lighten import compress
from lighten.data import DataSpec, load_data


class EncoderLM(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)))


@pytest.mark.parametrize("step", [{"llm.weight_only": {"method": "rtn"}},
                                  {"llm.smoothquant": {"calib_samples": 16}}])
def test_llm_steps_quantize_a_stock_encoder_language_model(step, tmp_path):
    data = load_data(DataSpec(name="text", path=str(write_text(tmp_path / "t.txt")),
                              tokenizer="char", seq_len=16))
    torch.manual_seed(0)
    model = EncoderLM(data.task.vocab_size, 16).eval()
    ids = torch.stack([data.test[i][0] for i in range(2)])
    with torch.no_grad():
        before = model(ids)
    quantized, report = compress(model, step, data=data)
    assert any("unfused" in n for n in report.notes)
    with torch.no_grad():
        after = quantized(ids)
    assert after.shape == before.shape
    assert float((after - before).norm() / before.norm()) < 0.3  # close to the float model
