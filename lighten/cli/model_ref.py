"""Turn the MODEL argument of ``check``/``measure``/``export`` into a ready nn.Module and
its task (``lighten.task``: inputs, metrics), and ``--data`` into data for that task.

MODEL is one of: a zoo name (``lenet5``; shipped weights when lighten has them), a lighten
artifact (``runs/demo/stages/02-quant.ptq.safetensors``; the manifest knows the task: a
language model's vocabulary, a ``python:`` task's inputs), or a user factory
``file.py:factory`` (needs ``--input-shape``; with ``--data corpus.txt`` it is a language model
of that text, built with ``vocab_size``/``seq_len`` where its signature takes them).

DATA is a built-in name (fashion-mnist, digits, synthetic), a text file (a language model's test
text, tokenized with the model's recorded tokenizer), or ``file.py:function`` (also written
``python:file.py:function``, as in a recipe's ``data: {python: ...}``) returning ``(train,
test)`` datasets whose items the model's task reads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_CHOICES = ("fashion-mnist", "digits", "synthetic")
DATA_HELP = ("test data: fashion-mnist, digits, synthetic, a text file (language models) or "
             "[python:]file.py:function returning (train, test), the recipe data hook "
             "(default: the built-in dataset matching the input shape)")
_DATA_SHAPES = {"fashion-mnist": (1, 28, 28), "digits": (1, 8, 8)}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> (1, 28, 28); argparse turns the error into a usage message."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write C,H,W like 1,28,28")
    return shape


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="zoo name (lenet5, ...), a lighten .safetensors artifact, "
                             "or file.py:factory")
    parser.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                        help="per-sample input shape (required for file.py:factory)")
    parser.add_argument("--weights", metavar="FILE",
                        help="weights to load (.safetensors, or .pt/.pth read weights-only)")
    parser.add_argument("--trust", action="store_true",
                        help="unpickle --weights .pt/.pth in full (torch.load(weights_only="
                             "False)), and build an artifact's python: model by running the "
                             "file it names: this RUNS ANY CODE the files ask for; only for "
                             "files you made yourself")
    parser.add_argument("--num-classes", type=positive_int, metavar="N",
                        help="classes of a zoo model (default 10); inferred for file.py:factory")


@dataclass
class ResolvedModel:
    model: Any  # nn.Module, in eval mode
    input_shape: tuple[int, ...]
    num_classes: int
    label: str  # what to call it in tables
    spec: dict = field(default_factory=dict)  # ModelSpec as a dict, recorded in artifacts
    artifact: Path | None = None  # set when MODEL was an artifact file
    task: Any = None  # lighten.task.Task; None: classification of input_shape / num_classes

    def __post_init__(self) -> None:
        if self.task is None:
            from lighten.task import ClassificationTask

            self.task = ClassificationTask(self.input_shape, self.num_classes)


def describe_task(task) -> str:
    """One line for the terminal: what goes in, what comes out."""
    from lighten.task import ClassificationTask, LanguageModelTask

    if isinstance(task, ClassificationTask):
        return f"input {list(task.input_shape)}, {task.num_classes} classes"
    if isinstance(task, LanguageModelTask):
        tok = (task.tokenizer or {}).get("kind")
        return (f"language model: token ids [{task.seq_len}] int64, vocabulary "
                f"{task.vocab_size}{f' ({tok} tokenizer)' if tok else ''}")
    inputs = ", ".join(f"{s.name} {list(s.shape)} {str(s.dtype).removeprefix('torch.')}"
                       for s in task.inputs)
    return f"task {task.kind}: inputs {inputs}"


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def default_data(input_shape: tuple[int, ...]) -> str:
    """The built-in dataset whose samples have this shape; synthetic when none does."""
    for name, shape in _DATA_SHAPES.items():
        if tuple(input_shape) == shape:
            return name
    return "synthetic"


def resolve_model(ref: str, *, input_shape: tuple[int, ...] | None = None,
                  weights: str | None = None, num_classes: int | None = None,
                  data: str | None = None,
                  warn: Callable[[str], None] = _stderr_warning,
                  trust: bool = False) -> ResolvedModel:
    """Build the model MODEL names; every mistake is a one-line ModelError/CheckpointError.
    ``trust`` unpickles ``weights`` in full (it may run code; ``--trust``)."""
    from lighten.errors import ModelError

    path_part, sep, _ = ref.rpartition(":")
    if sep and path_part.endswith(".py"):
        return _from_python(ref, input_shape, weights, num_classes, data, trust)
    if ref.endswith(".safetensors") or Path(ref).is_file():
        return _from_artifact(ref, input_shape, weights, trust)
    from lighten.errors import did_you_mean
    from lighten.models import ZOO

    if ref in ZOO:
        return _from_zoo(ref, input_shape, weights, num_classes, data, warn, trust)
    raise ModelError(f"unknown model {ref!r}: not a zoo name ({', '.join(ZOO)}), not an "
                     "existing .safetensors artifact, not 'file.py:factory'"
                     + did_you_mean(ref, ZOO))


def _from_zoo(name, input_shape, weights, num_classes, data, warn, trust=False) -> ResolvedModel:
    from lighten.models import ModelSpec, build_model, load_weights, shipped_checkpoint

    shape = tuple(input_shape or _DATA_SHAPES.get(data or "", (1, 28, 28)))
    data_name = data or default_data(shape)
    classes = num_classes or 10
    spec = ModelSpec(zoo=name, weights=weights, trust_weights=trust or None)
    model = build_model(spec, input_shape=shape, num_classes=classes)
    label = name
    if weights is None:
        shipped = shipped_checkpoint(name, data_name)
        if shipped is not None:
            load_weights(model, shipped)
            label = f"{name} ({shipped.name})"
        else:
            warn(f"no shipped checkpoint for {name} on {data_name}; using random weights "
                 "(pass --weights FILE for a trained model)")
    return ResolvedModel(model.eval(), shape, classes, label,
                         spec.model_dump(exclude_none=True))


def _from_artifact(ref, input_shape, weights, trust=False) -> ResolvedModel:
    from lighten.errors import CheckpointError, ModelError

    path = Path(ref)
    if not path.is_file():
        raise CheckpointError(f"artifact {ref!r} does not exist; check the path (stages are "
                              "saved under OUTPUT/stages/)")
    if path.suffix != ".safetensors":
        raise ModelError(f"{ref!r} is a bare checkpoint without an architecture; use "
                         "`ZOO_NAME --weights FILE` or `file.py:factory --weights FILE`")
    if weights is not None:
        raise ModelError(f"{ref!r} is a lighten artifact that holds its own weights; "
                         "drop --weights")
    from lighten.artifact import load_artifact

    model, manifest = load_artifact(path, trust=trust)
    shape = tuple(manifest.get("input_shape") or ())
    if not shape:
        raise CheckpointError(f"{ref!r} has no input_shape in its manifest; is it a lighten "
                              "artifact? Load plain weights with `ZOO_NAME --weights FILE`")
    if input_shape is not None and tuple(input_shape) != shape:
        raise ModelError(f"--input-shape {list(input_shape)} differs from the artifact's "
                         f"{list(shape)}; drop --input-shape")
    classes = int(manifest.get("num_classes") or 0)
    task = None
    if isinstance(manifest.get("task"), dict):  # what the recipe's data made it for
        from lighten.errors import LightenError
        from lighten.task import task_from_dict

        try:
            task = task_from_dict(manifest["task"])
        except LightenError as err:
            raise CheckpointError(f"{ref!r} records a task that cannot be rebuilt here "
                                  f"({err})") from None
        classes = task.num_classes or classes
    return ResolvedModel(model.eval(), shape, classes, path.stem,
                         dict(manifest.get("model_spec") or {}), artifact=path, task=task)


def _from_python(ref, input_shape, weights, num_classes, data, trust=False) -> ResolvedModel:
    from torch import nn

    from lighten.data.pyref import load_callable
    from lighten.errors import ModelError
    from lighten.models import _accepted, check_model_outputs, load_weights

    if input_shape is None:
        raise ModelError(f"{ref!r} needs the input shape: add --input-shape C,H,W "
                         "(e.g. 1,28,28; a language model's: the sequence length, e.g. 128)")
    task = _text_task(data, input_shape)  # --data corpus.txt: a language model of that text
    factory = load_callable(ref, error=ModelError, what="model")
    try:
        model = factory(**(_accepted(factory, task.factory_kwargs()) if task else {}))
    except Exception as exc:  # user code
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelError(f"model factory {ref!r} raised {type(exc).__name__}: {first}") \
            from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {ref!r} returned {type(model).__name__}; "
                         "it must return a torch.nn.Module")
    if weights is not None:  # a lighten artifact's model may be pruned or quantized
        model = load_weights(model, weights, trust=trust)
    model.eval()
    spec = {"python": ref, "input_shape": list(input_shape)}
    if weights is not None:
        spec["weights"] = weights
    if task is not None:
        check_model_outputs(model, task, name=f"model {ref!r}")
        return ResolvedModel(model, tuple(input_shape), task.num_classes, ref, spec, task=task)
    classes = _classifier_outputs(model, ref, input_shape, num_classes)
    return ResolvedModel(model, tuple(input_shape), classes, ref, spec)


def _input_hint(exc: Exception) -> str:
    """What to pass when a model does not take one float tensor of --input-shape."""
    text = str(exc)
    if "indices" in text and ("Long" in text or "Int" in text):  # an nn.Embedding first
        return ("it takes token ids: pass --data corpus.txt (a language model) or --data "
                "python:FILE.py:FUNCTION whose task gives int64 inputs")
    if "missing" in text and "required positional argument" in text:  # several inputs
        return ("it takes several inputs, and FILE.py:FACTORY models get one tensor of "
                "--input-shape here: give a recipe whose data names the task (data: {python: "
                "..., task: ...}), or an artifact saved with its task (save_artifact(..., "
                "task=...)), whose inputs the commands read")
    return "check --input-shape"


def _classifier_outputs(model, ref, input_shape, num_classes) -> int:
    """The class count of a classifier on one float input (ModelError when it is not one)."""
    import torch

    from lighten.errors import ModelError

    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # a wrong shape fails somewhere inside the user's layers
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"model {ref!r} cannot run on input shape {list(input_shape)} "
                         f"({type(exc).__name__}: {first}); {_input_hint(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {ref!r} returns {got}; lighten needs logits of shape "
                         "(batch, classes) (a language model: pass --data corpus.txt)")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelError(f"model {ref!r} returns {out.shape[1]} classes, not "
                         f"--num-classes {num_classes}; fix one of them")
    return int(out.shape[1])


def _data_kind(name: str | None) -> str:
    """builtin | python | text | none, from the ``--data`` value."""
    if name is None:
        return "none"
    if name in DATA_CHOICES:
        return "builtin"
    path_part, sep, _ = name.removeprefix("python:").rpartition(":")
    if sep and path_part.endswith(".py"):  # file.py:function, or python:file.py:function
        return "python"
    return "text"


def _text_task(data: str | None, input_shape):
    """A language-model task fitted to the text file ``data`` (char vocabulary), seq_len from
    ``--input-shape``; None when ``data`` is not a text file."""
    if _data_kind(data) != "text":
        return None
    from lighten.data.text import load_text
    from lighten.errors import DataError
    from lighten.task import LanguageModelTask

    if len(input_shape) != 1:
        raise DataError(f"--data {data} is text, so MODEL is a language model: give its "
                        f"sequence length as --input-shape T, not {list(input_shape)}")
    _check_text_path(data)
    _, _, tok = load_text(data, tokenizer="char", seq_len=int(input_shape[0]))
    return LanguageModelTask(tok.vocab_size, int(input_shape[0]), tokenizer=tok.describe())


def _check_text_path(name: str) -> None:
    from lighten.errors import DataError

    if not Path(name).expanduser().is_file():
        raise DataError(f"--data {name!r} is not a built-in dataset ({', '.join(DATA_CHOICES)}), "
                        "not file.py:function and not an existing text file")


def load_data_for(name: str | None, resolved):
    """The test data ``--data`` names, for the model's task, checked against the model so a
    mismatch is one clear line, not a crash mid-run: a built-in dataset (classification; the one
    matching the input shape when ``name`` is None), a text file (a language model's text,
    tokenized with the model's tokenizer) or ``file.py:function`` (any task)."""
    from lighten.data import DataSpec, load_data
    from lighten.errors import DataError
    from lighten.task import ClassificationTask, LanguageModelTask

    task = resolved.task
    kind = _data_kind(name)
    classify = isinstance(task, ClassificationTask)
    if kind == "python":
        return _python_data(name, resolved)
    if kind == "text":
        if not isinstance(task, LanguageModelTask):
            raise DataError(f"--data {name} is text, for a language model; {resolved.label} is "
                            f"{'a classifier' if classify else f'a {task.kind} model'}: give "
                            "it data of its own (file.py:function)")
        return _text_data(name, task)
    if not classify:
        what = ("a text file (e.g. --data corpus.txt)" if isinstance(task, LanguageModelTask)
                else "file.py:function returning (train, test) datasets")
        raise DataError(f"{resolved.label} is a {task.kind} model ({describe_task(task)}); "
                        f"the built-in datasets are for classifiers: pass --data {what}")
    name = name or default_data(resolved.input_shape)
    if name == "synthetic":
        spec = DataSpec(name="synthetic", input_shape=list(resolved.input_shape),
                        num_classes=max(resolved.num_classes, 2))
    else:
        spec = DataSpec(name=name)
    bundle = load_data(spec)
    _check_classes(name, bundle, resolved)
    return bundle


def _check_classes(name: str, bundle, resolved) -> None:
    from lighten.errors import DataError

    if tuple(bundle.input_shape) != tuple(resolved.input_shape):
        raise DataError(f"{name} samples are {list(bundle.input_shape)} but the model takes "
                        f"{list(resolved.input_shape)}; pick matching --data or --input-shape")
    if resolved.num_classes and bundle.num_classes != resolved.num_classes:
        raise DataError(f"{name} has {bundle.num_classes} classes but the model outputs "
                        f"{resolved.num_classes}; pick matching --data or --num-classes")


def _text_data(name: str, task):
    """A text file cut into the model's windows, tokenized with the tokenizer its task records
    (a char vocabulary from training; bytes when none is recorded and the vocabulary is 256)."""
    from lighten.data import DataBundle
    from lighten.data.text import Tokenizer, load_text
    from lighten.errors import DataError

    _check_text_path(name)
    if task.tokenizer:
        tok = Tokenizer.from_description(task.tokenizer)
    elif task.vocab_size == 256:
        tok = Tokenizer("bytes")
    else:
        raise DataError(f"the model records no tokenizer (vocabulary {task.vocab_size}), so "
                        f"the text of {name} cannot be turned into its token ids; pass "
                        "--data file.py:function returning (ids, next_ids) datasets")
    if tok.vocab_size != task.vocab_size:
        raise DataError(f"the recorded tokenizer has {tok.vocab_size} tokens but the model "
                        f"{task.vocab_size}; the artifact is inconsistent, re-save it")
    train, test, tok = load_text(name, tokenizer=tok, seq_len=task.seq_len)
    return DataBundle("text", train, test, (task.seq_len,), task.vocab_size,
                      f"{tok.kind} tokens of {name}", task=task)


def _python_data(name: str, resolved):
    """``file.py:function`` -> (train, test) datasets, read through the model's task."""
    from lighten.data import bundle_from_datasets
    from lighten.data.pyref import load_callable
    from lighten.errors import DataError
    from lighten.task import ClassificationTask

    fn = load_callable(name.removeprefix("python:"), error=DataError, what="data")
    try:
        result = fn()
    except Exception as exc:  # user code
        raise DataError(f"data function {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(f"data function {name!r} returned {type(result).__name__}; it must "
                        "return (train_dataset, test_dataset)")
    classify = isinstance(resolved.task, ClassificationTask)
    bundle = bundle_from_datasets(result[0], result[1], name=name,
                                  task=None if classify else resolved.task)
    if classify:
        _check_classes(name, bundle, resolved)
    return bundle
