"""Real text and real tokenizers for the language-model task.

* ``data: {name: text, corpus: austen}``: Jane Austen's six novels from Debian's
  ``r-cran-janeaustenr`` (``apt-get install r-cran-janeaustenr``; an R lazy-load database read
  with PyPI ``rdata``, no R needed). ``austen/emma`` (``mansfieldpark``, ``northangerabbey``,
  ``persuasion``, ``prideprejudice``, ``sensesensibility``) is one novel. The books are joined in
  the package's order, lines by newlines, so the last 10% (the test split) is the end of
  *Sense and Sensibility*.
* ``tokenizer: {hf: SOURCE}``: the tokenizer stored with a transformers model (a folder, a
  .gguf file or an installed package, as ``model: {hf: ...}``); recorded as
  ``{"kind": "hf", "source": ...}`` so ids decode again.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch

from lighten.errors import DataError

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                "sensesensibility")
CORPORA = ("austen", *(f"austen/{b}" for b in AUSTEN_BOOKS))


def _require_rdata():
    try:
        import rdata
    except ImportError:
        raise DataError("corpus: austen reads an R data file with rdata; install the llm "
                        "extra: pip install 'lighten[llm]'") from None
    return rdata


def austen_books(names=None, directory: str | os.PathLike | None = None) -> dict[str, str]:
    """``{book: text}`` of janeaustenr's lazy-load database (``Rdata.rdx`` index: offsets into
    ``Rdata.rdb``, each entry a 4-byte length and a zlib-compressed serialized R vector);
    ``names``: only these books (each takes seconds to parse)."""
    import warnings

    rdata = _require_rdata()
    folder = Path(directory or os.environ.get("LIGHTEN_JANEAUSTENR", AUSTEN_DIR))
    index, db = folder / "Rdata.rdx", folder / "Rdata.rdb"
    if not index.is_file() or not db.is_file():
        raise DataError(f"Jane Austen's novels are not in {folder}; install them with "
                        "apt-get install r-cran-janeaustenr (or set LIGHTEN_JANEAUSTENR to the "
                        "package's data folder)")
    with warnings.catch_warnings():  # the .rdx is gzip'd RDS without an extension rdata knows
        warnings.simplefilter("ignore")
        variables = rdata.conversion.convert(rdata.parser.parse_file(index))["variables"]
    raw = db.read_bytes()
    books = {}
    for name, (offset, length) in variables.items():
        if names is not None and str(name) not in names:
            continue
        blob = raw[int(offset): int(offset) + int(length)]
        (size,) = struct.unpack(">I", blob[:4])
        body = zlib.decompress(blob[4:])
        if len(body) != size:
            raise DataError(f"{db} entry {name!r} is corrupt; reinstall r-cran-janeaustenr")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lines = rdata.conversion.convert(rdata.parser.parse_data(body))
        books[str(name)] = "\n".join(str(line) for line in lines)
    return books


def corpus_text(name: str) -> str:
    """The text of a named corpus (:data:`CORPORA`)."""
    if name not in CORPORA:
        from lighten.errors import did_you_mean

        raise DataError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}"
                        f"{did_you_mean(name, CORPORA)}")
    chosen = AUSTEN_BOOKS if name == "austen" else (name.split("/", 1)[1],)
    books = austen_books(chosen)
    return "\n\n".join(books[b] for b in chosen)


class HFTokenizer:
    """A transformers tokenizer with the interface of :class:`lighten.data.text.Tokenizer`."""

    kind = "hf"

    def __init__(self, source: str, gguf: str | None = None):
        from lighten.errors import ModelError
        from lighten.llm.sources import load_tokenizer

        self.source, self.gguf = str(source), gguf
        try:
            self.tok = load_tokenizer(self.source, gguf=gguf)
        except ModelError as err:
            raise DataError(f"tokenizer {{hf: {self.source}}}: {err}") from None

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in torch.as_tensor(ids).reshape(-1)])

    def describe(self) -> dict:
        return {"kind": "hf", "source": self.source, **({"gguf": self.gguf} if self.gguf else {})}
