"""A text file as language-model data: ``data: {name: text, path: corpus.txt, tokenizer: char,
seq_len: 128}``.

Tokenizers (no download, nothing to install):

* ``char``: one id per distinct character of the file, in sorted order; the vocabulary is recorded
  (``LanguageModelTask.tokenizer``, hence run.json and the artifact) so ids can be decoded again;
* ``bytes``: the file's UTF-8 bytes, vocabulary 256.

Split, deterministic: the first 90% of the tokens train, the last 10% test. Each split is cut into
non-overlapping windows of ``seq_len + 1`` tokens; an item is ``(ids[:-1], ids[1:])``, both int64
of shape ``(seq_len,)``, so the target at position t is the token after input position t.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from lighten.errors import DataError

TEST_FRACTION = 0.1


class Tokenizer:
    """Text <-> ids for the ``char`` and ``bytes`` tokenizers."""

    def __init__(self, kind: Literal["char", "bytes"], vocab: str | None = None):
        self.kind = kind
        self.vocab = vocab
        self._index = {c: i for i, c in enumerate(vocab)} if vocab is not None else None

    @classmethod
    def fit(cls, kind, text: str) -> Tokenizer:
        if isinstance(kind, dict) and "hf" in kind:  # a transformers model's own tokenizer
            from lighten.llm.text import HFTokenizer

            return HFTokenizer(kind["hf"], kind.get("gguf"))
        if kind == "bytes":
            return cls("bytes")
        if kind == "char":
            return cls("char", "".join(sorted(set(text))))
        raise DataError(f"unknown tokenizer {kind!r}; use char or bytes")

    @classmethod
    def from_description(cls, facts: dict) -> Tokenizer:
        """The tokenizer :meth:`describe` recorded (``LanguageModelTask.tokenizer``)."""
        kind = facts.get("kind") if isinstance(facts, dict) else None
        if kind == "hf" and isinstance(facts.get("source"), str):
            from lighten.llm.text import HFTokenizer

            return HFTokenizer(facts["source"], facts.get("gguf"))
        if kind == "bytes":
            return cls("bytes")
        if kind == "char" and isinstance(facts.get("vocab"), str) and facts["vocab"]:
            return cls("char", facts["vocab"])
        raise DataError(f"recorded tokenizer {facts!r} is not char (with its vocab) or bytes")

    @property
    def vocab_size(self) -> int:
        return 256 if self.kind == "bytes" else len(self.vocab or "")

    def encode(self, text: str) -> torch.Tensor:
        if self.kind == "bytes":
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
        unknown = sorted(set(text) - set(self._index or {}))
        if unknown:
            raise DataError(f"characters {unknown[:5]} are not in the char vocabulary; "
                            "use tokenizer: bytes for open-ended text")
        return torch.tensor([self._index[c] for c in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        if self.kind == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.vocab[i] for i in ids)

    def describe(self) -> dict:
        return {"kind": self.kind, **({"vocab": self.vocab} if self.kind == "char" else {})}


def windows(ids: torch.Tensor, seq_len: int) -> TensorDataset:
    """Non-overlapping ``(ids[T], next_ids[T])`` windows of ``ids``; a short tail is dropped."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        return TensorDataset(torch.empty(0, seq_len, dtype=torch.int64),
                             torch.empty(0, seq_len, dtype=torch.int64))
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return TensorDataset(x.contiguous(), y.contiguous())


def load_text(path: str | Path | None, *, tokenizer: str | dict | Tokenizer, seq_len: int,
              corpus: str | None = None):
    """(train, test, tokenizer) for the text file at ``path`` (or the named ``corpus``,
    :mod:`lighten.llm.text`). ``tokenizer`` is a kind (fitted to this text), ``{hf: SOURCE}``
    (a transformers model's tokenizer) or a tokenizer already fitted, e.g. a trained model's
    vocabulary."""
    if corpus is not None:
        from lighten.llm.text import corpus_text

        text = corpus_text(corpus)
        tok = Tokenizer.fit(tokenizer, text) if isinstance(tokenizer, str | dict) else tokenizer
        raw = text.encode("utf-8") if tok.kind == "bytes" else b""
        ids = torch.tensor(list(raw), dtype=torch.int64) if raw else tok.encode(text)
        return _split(ids, f"corpus {corpus!r}", seq_len) + (tok,)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist; fix data.path")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"text file {str(path)!r} is empty; give it some text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if getattr(tokenizer, "kind", tokenizer) != "bytes":
            raise DataError(f"text file {str(path)!r} is not UTF-8 ({err.reason} at byte "
                            f"{err.start}); use tokenizer: bytes") from None
        text = raw.decode("utf-8", errors="replace")
    tok = Tokenizer.fit(tokenizer, text) if isinstance(tokenizer, str | dict) else tokenizer
    ids = torch.tensor(list(raw), dtype=torch.int64) if tok.kind == "bytes" else tok.encode(text)
    return _split(ids, f"text file {str(path)!r}", seq_len) + (tok,)


def _split(ids: torch.Tensor, what: str, seq_len: int) -> tuple[TensorDataset, TensorDataset]:
    """The first 90% of ``ids`` as training windows, the last 10% as test windows."""
    if len(ids) <= seq_len:
        raise DataError(f"{what} has {len(ids)} tokens, not more than seq_len "
                        f"{seq_len}; lower data.seq_len or give a longer text")
    cut = int(len(ids) * (1 - TEST_FRACTION))
    train, test = windows(ids[:cut], seq_len), windows(ids[cut:], seq_len)
    if len(train) == 0 or len(test) == 0:
        split, have = ("train", cut) if len(train) == 0 else ("test", len(ids) - cut)
        raise DataError(f"{what} has {len(ids)} tokens: its {split} part "
                        f"({have} tokens; the last {TEST_FRACTION:.0%} is test) holds no window "
                        f"of seq_len + 1 = {seq_len + 1}; lower data.seq_len or give at least "
                        f"{int((seq_len + 1) / TEST_FRACTION) + 1} tokens")
    return train, test
