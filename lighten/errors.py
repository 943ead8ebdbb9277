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
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


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


class ExportError(LightenError):
    """An exported model does not run or does not match the PyTorch model."""


class UnsupportedError(LightenError):
    """A technique cannot handle some part of the model; the message names the module."""


class BackendError(LightenError):
    """A deployment backend is missing or cannot execute the model."""


class ReportError(LightenError):
    """A run directory has no usable metrics to report."""
