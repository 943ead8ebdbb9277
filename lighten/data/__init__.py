"""Datasets as in-memory tensors: Fashion-MNIST, sklearn digits, synthetic, or user code.

Everything ends up as a :class:`DataBundle` of two map-style datasets whose items are
``(x: float32 tensor of input_shape, y: int64 scalar)``; fast random access keeps calibration
and evaluation cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, Dataset

from lighten.errors import DataError
from lighten.step import StrictModel

__all__ = ["DataBundle", "DataSpec", "bundle_from_datasets", "load_data", "make_loader"]


class DataSpec(StrictModel):
    """The ``data:`` block of a recipe: a built-in ``name`` or a ``python: file.py:function``."""

    name: Literal["fashion-mnist", "digits", "synthetic"] | None = None
    python: str | None = Field(None, description="'file.py:function' -> (train, test) datasets")
    root: str | None = Field(None, description="Fashion-MNIST folder (overrides the env var)")
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    samples: int = Field(512, ge=1, description="synthetic: training samples")
    input_shape: list[int] = Field(default_factory=lambda: [1, 28, 28],
                                   description="synthetic: shape of one input")
    num_classes: int = Field(10, ge=2, description="synthetic: number of classes")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.name is None) == (self.python is None):
            raise ValueError("data needs exactly one of 'name' (fashion-mnist, digits, synthetic) "
                             "or 'python' ('file.py:function')")
        if any(d < 1 for d in self.input_shape) or not self.input_shape:
            raise ValueError(f"input_shape {self.input_shape} must be non-empty positive sizes")
        return self


@dataclass
class DataBundle:
    name: str
    train: Dataset  # items: (x float32 of input_shape, y int64 scalar)
    test: Dataset
    input_shape: tuple[int, ...]  # without batch, e.g. (1, 28, 28)
    num_classes: int
    transform: str = ""  # how raw inputs were turned into x, so users can reproduce it


def load_data(spec: DataSpec) -> DataBundle:
    """Build the bundle a recipe's ``data:`` block describes."""
    if spec.python is not None:
        return _load_python(spec)
    if spec.name == "fashion-mnist":
        from lighten.data import fashion_mnist as fm

        directory = fm.resolve_dir(spec.root)
        train = fm.load_split(directory, "train", limit=spec.limit_train)
        test = fm.load_split(directory, "test", limit=spec.limit_test)
        transform = f"x = (pixel / 255 - {fm.MEAN}) / {fm.STD}"
        return DataBundle("fashion-mnist", train, test, (1, 28, 28), 10, transform)
    if spec.name == "digits":
        from lighten.data.builtin import load_digits_split

        train, test = load_digits_split(limit_train=spec.limit_train, limit_test=spec.limit_test)
        return DataBundle("digits", train, test, (1, 8, 8), 10, "x = pixel / 16")
    from lighten.data.builtin import make_synthetic

    train, test = make_synthetic(samples=spec.samples, input_shape=tuple(spec.input_shape),
                                 num_classes=spec.num_classes)
    bundle = bundle_from_datasets(train, test, name="synthetic")
    bundle.num_classes = spec.num_classes  # a small sample may miss a class; trust the spec
    return _limit(bundle, spec)


def bundle_from_datasets(train: Dataset, test: Dataset, *, name: str = "user") -> DataBundle:
    """Wrap any user dataset pair, inferring input shape and class count from the data."""
    for split, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise DataError(f"{name} {split} split is a {type(ds).__name__}, not a map-style "
                            "Dataset; return e.g. torch.utils.data.TensorDataset(x, y)")
        if len(ds) == 0:
            raise DataError(f"{name} {split} split is empty; return at least one sample")
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
        raise DataError(f"{name} {split} inputs must be float tensors, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}; convert with .float()")
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
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(f"data function {spec.python!r} returned {type(result).__name__}; "
                        "it must return (train_dataset, test_dataset)")
    bundle = bundle_from_datasets(result[0], result[1], name="user")
    return _limit(bundle, spec)
