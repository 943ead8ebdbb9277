"""Progress output that suits where it goes.

On a terminal: tqdm bars (redrawn in place with carriage returns). On a file or a pipe
(``lighten run ... > log``, CI, ``make demo``) bars would write every redraw, so none are shown
there; the training loop and the runner print one plain line per epoch and per stage instead
(:func:`line`). ``progress=False`` (``--quiet``) silences both.
"""

from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Whether stderr (where progress goes) is an interactive terminal."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
        enabled: bool = True, leave: bool = False):
    """A tqdm bar on a terminal; a silent pass-through elsewhere or when not ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave,
                disable=not (enabled and on_terminal()))


def line(message: str, *, enabled: bool = True, terminal: bool = False) -> None:
    """One progress line on stderr when ``enabled`` and stderr is not a terminal (there the
    bars show it), or on a terminal too with ``terminal=True``."""
    if enabled and (terminal or not on_terminal()):
        print(message, file=sys.stderr, flush=True)
