"""Int8 embedding tables: one scale per row, gathered then scaled.

An embedding lookup does no arithmetic, so it needs no integer kernel: the table is stored as
int8 codes with one float scale per row, and a lookup gathers the codes and the scales of the
requested rows and multiplies them. In ONNX that is ``Gather(int8) -> Cast -> Mul(Gather(scale))``,
which every runtime runs. Why it matters: in a BERT-size sentence encoder the word-embedding
table is half of the parameters (all-MiniLM-L6-v2: 11.7 M of 22.7 M), so leaving it float keeps
the file at more than twice the size of its int8 Linears.

Per-row (not per-tensor) scales because rows differ in norm by an order of magnitude (frequent
tokens are short vectors, rare ones long); a row is rounded to at most half a step of its own
largest entry.
"""

from __future__ import annotations

import torch
from torch import nn

from lighten.modules import register_module_type
from lighten.quant.dynamic import symmetric_codes


@register_module_type
class Int8Embedding(nn.Module):
    """``nn.Embedding`` with symmetric int8 rows (one float scale per row)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None,
                 bits: int = 8):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"Int8Embedding holds 2 to 8-bit codes, got bits={bits}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.bits = padding_idx, bits
        self.register_buffer("weight_int", torch.zeros(num_embeddings, embedding_dim,
                                                       dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @classmethod
    def from_float(cls, embedding: nn.Embedding, *, bits: int = 8,
                   **linear_options) -> Int8Embedding:
        """``linear_options`` (quant.dynamic's ``per_channel``, ``reduce_range``) do not apply:
        every row has its own scale, and no integer GEMM reads the codes."""
        if embedding.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalizes its rows on every lookup "
                             "and cannot be stored as int8; leave it out with ignore")
        q = cls(embedding.num_embeddings, embedding.embedding_dim,
                padding_idx=embedding.padding_idx, bits=bits)
        q.set_weight(embedding.weight.detach())
        return q

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        codes, scale = symmetric_codes(weight.float(), self.qmax)
        self.weight_scale.copy_(scale)
        self.weight_int.copy_(codes.to(torch.int8))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int.float() * self.weight_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int[ids].float() * self.weight_scale[ids].unsqueeze(-1)

    def artifact_config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "bits": self.bits}

    @classmethod
    def from_artifact(cls, config: dict) -> Int8Embedding:
        return cls(**config)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} rows"
