"""A small exception hierarchy. Every message says what is wrong and what to do next.

The CLI prints ``LightenError`` subclasses as one line and exits non-zero; anything else is a bug
and gets a traceback.
"""

from collections.abc import Iterable


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'resnet20'?"`` for a near-miss of one of ``choices`` (case ignored),
    else ``""``: the tail every "unknown name" message in lighten ends with."""
    import difflib

    lowered = {choice.lower(): choice for choice in choices}
    # one slip (a letter dropped, added, changed or two swapped) first: difflib alone misses
    # them in short names ('ur' for 'lr')
    close = [c for c in lowered if _one_slip(str(name).lower(), c)]
    ranked = difflib.get_close_matches(str(name).lower(), close or list(lowered), n=1,
                                       cutoff=0.0 if close else 0.6)
    return f"; did you mean {lowered[ranked[0]]!r}?" if ranked else ""


def _one_slip(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ by one deletion, insertion, substitution or swap."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((k for k in range(len(a)) if a[k] != b[k]), len(a))
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])


class LightenError(Exception):
    """Base class for errors caused by user input or the environment, not by lighten bugs."""


class RecipeError(LightenError):
    """A recipe file is missing, is not valid YAML, or does not match the schema."""


class DataError(LightenError):
    """A dataset is missing, malformed, or does not fit the model."""


class ModelError(LightenError):
    """A model cannot be built, loaded, traced or run with the given input shape."""


class CheckpointError(LightenError):
    """A weights/artifact file is missing, truncated, foreign, or unsafe to load."""


class UntrustedCodeError(CheckpointError):
    """A file asks for code to be run (a pickle, an artifact's ``python:`` model) and the
    caller has not said it trusts the file (``--trust`` / ``trust=True``)."""


class ExportError(LightenError):
    """An exported model does not run or does not match the PyTorch model."""


class UnsupportedError(LightenError):
    """A technique cannot handle some part of the model; the message names the module."""


class BackendError(LightenError):
    """A deployment backend is missing or cannot execute the model."""


class ReportError(LightenError):
    """A run directory has no usable metrics to report."""
