"""What a model is *for*: its inputs, its loss, its metrics and what "agreement" means.

Every component asks the data bundle's task instead of assuming a classifier on one float
tensor: training takes ``task.loss``, measurement ``task.metrics`` / ``task.agreement``, MAC
counting, export and latency ``task.inputs`` / ``task.example_inputs``, the model check
``task.check_outputs``. Built in:

* :class:`ClassificationTask` (the default): one float input ``(B, *input_shape)``, logits
  ``(B, classes)``, cross-entropy, accuracy + macro-F1, top-1 agreement;
* :class:`LanguageModelTask`: token ids ``(B, T)`` int64 in, logits ``(B, T, V)`` out; items are
  ``(ids[T], next_ids[T])`` pairs (``next_ids[t] == ids[t + 1]`` within the text); next-token
  cross-entropy; metrics perplexity (exp of the mean token NLL) and next-token accuracy;
  agreement = next-token top-1 match with the baseline;
* ``embedding`` (:class:`lighten.llm.embedding.EmbeddingTask`, imported on demand): ids and
  mask in, one sentence embedding out; linear-probe accuracy, agreement = mean cosine.

Anything else: a ``Task`` subclass from user code, ``data: {..., task: {python: tasks.py:make}}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lighten.errors import DataError, ModelError

__all__ = ["ClassificationTask", "InputSpec", "Inputs", "LanguageModelTask", "Task",
           "batch_inputs", "batch_rows", "input_specs", "make_task", "random_arrays",
           "task_from_dict"]


@dataclass(frozen=True)
class InputSpec:
    """One positional input of ``model(*inputs)``: its per-sample shape (no batch) and dtype.

    Integer inputs (token ids) hold values in ``[0, high)``: random timing inputs respect it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class Task:
    """Base class: subclass it for a task lighten does not know (``python: tasks.py:make``).

    A subclass sets ``inputs`` (a tuple of :class:`InputSpec`) and overrides :meth:`loss`,
    :meth:`metrics` and :meth:`check_outputs`; the rest has sensible defaults.
    """

    kind = "task"
    primary = "accuracy"  # the metrics() key shown first; higher_is_better says which way is up
    higher_is_better = True
    inputs: tuple[InputSpec, ...] = ()
    #: robustness probes perturb float images; other inputs are skipped with a note
    perturbable = False
    #: the outputs are class logits (a softmax over the last axis is meaningful): what
    #: soft-target distillation (hinton, dkd, mutual, ...) compares
    class_logits = False

    # -- inputs
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the first input (DataBundle.input_shape keeps meaning this)."""
        return tuple(self.inputs[0].shape) if self.inputs else ()

    @property
    def num_classes(self) -> int:
        return 0

    def example_inputs(self, batch: int = 1) -> tuple[Tensor, ...]:
        """Positional arguments of ``model(*inputs)``: zeros of every input's shape and dtype."""
        return tuple(torch.zeros(batch, *s.shape, dtype=s.dtype) for s in self.inputs)

    def random_inputs(self, batch: int, *, seed: int = 0) -> tuple[Tensor, ...]:
        """A fixed random batch (timing, export checks): normal floats, uniform integer ids."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for s in self.inputs:
            if s.is_float:
                out.append(torch.randn(batch, *s.shape, generator=g).to(s.dtype))
            else:
                out.append(torch.randint(0, s.high or 2, (batch, *s.shape), generator=g,
                                         dtype=s.dtype))
        return tuple(out)

    def as_inputs(self, x: Any) -> tuple[Tensor, ...]:
        """A collated batch's ``x`` (a tensor, or a list/tuple of tensors) as ``model(*...)``
        arguments."""
        return tuple(x) if isinstance(x, (tuple, list)) else (x,)

    # -- what the model computes
    def loss(self, outputs: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define loss(outputs, targets)")

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} must define metrics(outputs, targets)")

    def score(self, outputs: Tensor, targets: Tensor) -> float:
        """One higher-is-better number (sensitivity sweeps): ``metrics()['accuracy']``."""
        return float(self.metrics(outputs, targets)["accuracy"])

    def agreement(self, outputs: Tensor, reference: Tensor) -> float:
        """Fraction of top-1 predictions (last axis) equal to the reference's."""
        pred = _top1(outputs)
        ref = reference if not reference.is_floating_point() else _top1(reference)
        if ref.shape != pred.shape:
            raise DataError(f"reference has shape {tuple(ref.shape)} but predictions "
                            f"{tuple(pred.shape)}; compare predictions on the same samples")
        return float((pred == ref).double().mean()) if pred.numel() else 1.0

    def reference(self, outputs: Tensor) -> Tensor:
        """What a baseline keeps to compute agreement later (default: the outputs)."""
        return outputs

    def check_outputs(self, outputs: Any, batch: int, *, name: str = "the model",
                      hint: str = "") -> None:
        """ModelError unless ``outputs`` is a tensor with ``batch`` rows."""
        if not isinstance(outputs, Tensor) or outputs.shape[:1] != (batch,):
            got = (list(outputs.shape) if isinstance(outputs, Tensor)
                   else type(outputs).__name__)
            raise ModelError(f"{name} returns {got} for a batch of {batch}; expected a tensor "
                             f"with {batch} rows{hint}")

    def check_item(self, item: Any, where: str) -> None:
        """DataError unless a dataset item is an ``(x, y)`` pair (override to check more)."""
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{where} items must be (x, y) pairs, got {type(item).__name__}")

    # -- building models and recording runs
    def factory_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments a ``python:`` model factory receives (if it accepts them)."""
        return {}

    #: a pretrained ``model: {hf: ...}`` is the baseline as loaded; a task whose model adds
    #: untrained layers to it (a classifier head) sets this, and the runner trains the baseline
    trains_pretrained = False

    def fit_baseline(self, model: Any, train: Any, cfg: Any, *, progress: bool = False,
                     checkpoint: Any = None) -> list[float]:
        """Train the recipe's baseline in place (the runner's baseline stage; ``cfg``: the
        recipe's ``train:`` block): :func:`lighten.training.train` on :meth:`loss`."""
        from lighten.training import train as train_loop

        return train_loop(model, train, cfg, progress=progress, task=self, checkpoint=checkpoint)

    def describe(self) -> dict[str, Any]:
        """JSON facts recorded with a run and an artifact (:func:`task_from_dict` reverses)."""
        made_by = getattr(self, "made_by", None)  # set by make_task for python: factories
        return dict(made_by) if made_by else self._facts()

    def _facts(self) -> dict[str, Any]:
        return {"kind": self.kind}


# ----------------------------------------------------------------------------- classification


class ClassLogitsTask(Task):
    """Logits ``(B, C)`` against int64 class labels ``(B,)``: cross-entropy, accuracy and
    macro-F1, top-1 agreement. Image and text classification differ only in their inputs."""

    class_logits = True

    def loss(self, outputs: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        from lighten.measure.metrics import accuracy, macro_f1

        return {"accuracy": accuracy(outputs, targets), "macro_f1": macro_f1(outputs, targets)}

    def score(self, outputs: Tensor, targets: Tensor) -> float:
        from lighten.measure.metrics import accuracy

        return accuracy(outputs, targets)

    def agreement(self, outputs: Tensor, reference: Tensor) -> float:
        from lighten.measure.metrics import agreement

        return agreement(outputs, reference)


class ClassificationTask(ClassLogitsTask):
    """One float input of ``input_shape``; logits ``(B, num_classes)``; labels int64 ``(B,)``."""

    kind = "classification"
    perturbable = True

    def __init__(self, input_shape: Sequence[int], num_classes: int):
        self._shape = tuple(int(d) for d in input_shape)
        self._classes = int(num_classes)
        self.inputs = (InputSpec("input", self._shape, torch.float32),)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_classes(self) -> int:
        return self._classes

    def check_outputs(self, outputs: Any, batch: int, *, name: str = "the model",
                      hint: str = "") -> None:
        classes = self._classes
        if not isinstance(outputs, Tensor):
            raise ModelError(f"{name} returns a {type(outputs).__name__}, expected one logits "
                             f"tensor (batch, {classes}); make forward return only the logits")
        if tuple(outputs.shape) != (batch, classes):
            raise ModelError(f"{name} returns {tuple(outputs.shape)} for a batch of {batch}, "
                             f"expected logits ({batch}, {classes}){hint}")

    def _facts(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self._shape),
                "num_classes": self._classes}

    def __repr__(self) -> str:
        return f"ClassificationTask(input_shape={self._shape}, num_classes={self._classes})"


# ----------------------------------------------------------------------------- language model


class LanguageModelTask(Task):
    """Token ids ``(B, T)`` int64 -> logits ``(B, T, V)``; targets ``(B, T)`` are the next ids."""

    kind = "language-model"
    primary = "perplexity"
    higher_is_better = False
    class_logits = True  # over the vocabulary, per position

    def __init__(self, vocab_size: int, seq_len: int, *, tokenizer: dict | None = None):
        if int(vocab_size) < 2 or int(seq_len) < 1:
            raise DataError(f"language-model task needs vocab_size >= 2 and seq_len >= 1, got "
                            f"{vocab_size} and {seq_len}")
        self.vocab_size, self.seq_len = int(vocab_size), int(seq_len)
        self.tokenizer = tokenizer  # recorded (e.g. the char vocabulary) so ids can be decoded
        self.inputs = (InputSpec("ids", (self.seq_len,), torch.int64, high=self.vocab_size),)

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    def loss(self, outputs: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
        v = outputs.shape[-1]  # (B, T, V) logits against (B, T) next ids
        return F.cross_entropy(outputs.reshape(-1, v), targets.reshape(-1),
                               label_smoothing=label_smoothing)

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        if outputs.ndim != 3 or outputs.shape[0] == 0:
            raise DataError(f"language-model outputs must be (N, T, vocab) with N > 0, got "
                            f"{tuple(outputs.shape)}")
        flat = outputs.reshape(-1, outputs.shape[-1]).double()
        ids = targets.reshape(-1).long()
        nll = F.cross_entropy(flat, ids).item()  # mean over every token position
        acc = (flat.argmax(-1) == ids).double().mean().item()
        return {"perplexity": math.exp(min(nll, 700.0)), "accuracy": acc}

    def score(self, outputs: Tensor, targets: Tensor) -> float:
        return float((outputs.argmax(-1) == targets).double().mean())

    def reference(self, outputs: Tensor) -> Tensor:
        """The baseline's next-token predictions ``(N, T)`` int64: V times smaller than logits."""
        return _top1(outputs)

    def check_outputs(self, outputs: Any, batch: int, *, name: str = "the model",
                      hint: str = "") -> None:
        want = (batch, self.seq_len, self.vocab_size)
        if not isinstance(outputs, Tensor):
            raise ModelError(f"{name} returns a {type(outputs).__name__}, expected one logits "
                             f"tensor (batch, seq_len, vocab) = {want}")
        if tuple(outputs.shape) != want:
            raise ModelError(f"{name} returns {tuple(outputs.shape)} for token ids of shape "
                             f"({batch}, {self.seq_len}), expected next-token logits {want} "
                             f"(batch, seq_len, vocab_size){hint}")

    def check_item(self, item: Any, where: str) -> None:
        super().check_item(item, where)
        x, y = item
        for what, t in (("inputs", x), ("targets", y)):
            if not isinstance(t, Tensor) or t.is_floating_point() or t.shape != (self.seq_len,):
                got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor)
                       else type(t).__name__)
                raise DataError(f"{where} language-model {what} must be int64 token ids of "
                                f"shape ({self.seq_len},), got {got}")

    def factory_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "seq_len": self.seq_len}

    def _facts(self) -> dict[str, Any]:
        facts = {"kind": self.kind, "vocab_size": self.vocab_size, "seq_len": self.seq_len}
        return {**facts, "tokenizer": self.tokenizer} if self.tokenizer else facts

    def __repr__(self) -> str:
        return f"LanguageModelTask(vocab_size={self.vocab_size}, seq_len={self.seq_len})"


def _top1(outputs: Tensor) -> Tensor:
    if outputs.ndim < 2:
        raise DataError(f"outputs must have a class axis last, got shape {tuple(outputs.shape)}")
    return outputs.argmax(-1)


class Inputs(tuple):
    """The positional arguments of one ``model(*inputs)`` call, batched.

    Calibration batches of a multi-input model are ``Inputs``, told apart from an
    ``(inputs, targets)`` pair (``ctx.calibration_batches`` yields them; wrap your own tuples:
    ``Inputs((a, b))``).
    """

    __slots__ = ()


def batch_inputs(batch: Any) -> tuple[Tensor, ...]:
    """What ``model(*args)`` takes for one calibration batch: a tensor (one input), an
    :class:`Inputs` (several), or an ``(inputs, targets)`` pair whose inputs are a tensor or a
    tuple/list of tensors (what a DataLoader over ``((a, b), y)`` items collates)."""
    if isinstance(batch, Inputs):
        return tuple(batch)
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        if all(isinstance(a, Tensor) for a in args):
            return args
    raise DataError(f"a calibration batch must be a tensor, lighten.task.Inputs((a, b)) for a "
                    f"model with several inputs, or an (inputs, targets) pair; got "
                    f"{type(batch).__name__}")


def batch_rows(args: Sequence[Tensor]) -> int:
    """Samples in one batch of ``model(*args)`` arguments (the first input's batch axis)."""
    return int(args[0].shape[0]) if args else 0


def input_specs(input_shape=None, inputs: Sequence[InputSpec] | None = None
                ) -> tuple[InputSpec, ...]:
    """What export and the backends compile for: ``inputs`` (from ``task.inputs``) or, as
    before tasks, one float input of ``input_shape``."""
    if inputs:
        return tuple(inputs)
    if input_shape is None:
        raise ModelError("pass input_shape (one float input) or inputs (task.inputs)")
    return (InputSpec("input", tuple(int(d) for d in input_shape), torch.float32),)


def random_arrays(specs: Sequence[InputSpec], batch: int, *, seed: int = 0) -> list:
    """Fixed random numpy inputs for timing: the same for every backend and stage."""
    import numpy as np

    if batch < 1:
        from lighten.errors import BackendError

        raise BackendError(f"batch must be >= 1, got {batch}")
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        dtype = torch.empty(0, dtype=s.dtype).numpy().dtype
        if s.is_float:
            out.append(rng.standard_normal((batch, *s.shape), dtype=np.float32).astype(dtype))
        else:
            out.append(rng.integers(0, s.high or 2, (batch, *s.shape)).astype(dtype))
    return out


# ----------------------------------------------------------------------------- from a recipe

BUILTIN: dict[str, type[Task]] = {"classification": ClassificationTask,
                                  "language-model": LanguageModelTask}


def make_task(*, name: str | None = None, python: str | None = None,
              kwargs: dict[str, Any] | None = None) -> Task:
    """A built-in task by ``name`` or the ``Task`` a ``python: file.py:make`` factory returns.

    The factory is called with ``kwargs``; a built-in gets them as constructor arguments.
    """
    kwargs = dict(kwargs or {})
    if python is not None:
        from lighten.data.pyref import load_callable

        fn = load_callable(python, error=DataError, what="task")
        try:
            task = fn(**kwargs)
        except Exception as exc:  # user code
            raise DataError(f"task factory {python!r} raised {type(exc).__name__}: {exc}"
                            ) from exc
        if not isinstance(task, Task):
            raise DataError(f"task factory {python!r} returned {type(task).__name__}; it must "
                            "return a lighten.task.Task (subclass it, or use "
                            f"{' / '.join(BUILTIN)})")
        if not task.inputs:
            raise DataError(f"task from {python!r} declares no inputs; set "
                            "inputs = (InputSpec('input', shape, dtype),)")
        task.made_by = {"kind": "python", "python": python, "kwargs": kwargs}  # describe()
        return task
    if name == "embedding" and name not in BUILTIN:  # lives with the llm extra's code
        from lighten.llm.embedding import EmbeddingTask

        BUILTIN[name] = EmbeddingTask
    if name == "text-classification" and name not in BUILTIN:  # the llm extra's as well
        from lighten.llm.textclass import TextClassificationTask

        BUILTIN[name] = TextClassificationTask
    if name not in BUILTIN:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(BUILTIN)}, "
                        "embedding, text-classification or "
                        "{python: file.py:make}")
    try:
        return BUILTIN[name](**kwargs)
    except TypeError as exc:
        raise DataError(f"task {name!r} rejected {kwargs}: {exc}") from None


def task_from_dict(facts: dict[str, Any]) -> Task:
    """Rebuild a task from :meth:`Task.describe` (artifacts, run.json)."""
    facts = dict(facts)
    kind = facts.pop("kind", None)
    if kind == "python":
        return make_task(python=facts["python"], kwargs=facts.get("kwargs"))
    return make_task(name=kind, kwargs=facts)
