"""Refuse a torch file whose pickle would call anything but tensor rebuilding, before unpickling.

``torch.load(weights_only=True)`` is the second barrier, never the only one (CVE-2025-32434
bypassed it). This one reads the pickle's opcodes with :mod:`pickletools` -- nothing is
executed or imported -- and follows a symbolic stack far enough to know the name behind every
``GLOBAL``/``STACK_GLOBAL``/``INST``. Only the names a ``torch.save(state_dict)`` needs are
allowed (tensor and parameter rebuilders, storage and dtype types, ``OrderedDict``, ``set``,
``_codecs.encode`` for bytes); a name built from anything but literal strings, an extension-
registry code, a compressed pickle inside the zip or the ancient tar format is refused as well.

Formats read: torch.save's zip archive (every ``*.pkl`` member is scanned), the legacy format
(five pickles in a row, then raw storage bytes) and a bare pickle.
"""

from __future__ import annotations

import pickletools
import tarfile
import zipfile
from pathlib import Path

import torch

__all__ = ["ALLOWED_GLOBALS", "UnsafePickle", "scan_torch_file"]


def _allowed() -> frozenset[str]:
    names = {
        "collections.OrderedDict", "builtins.set", "builtins.frozenset", "__builtin__.set",
        "__builtin__.frozenset", "_codecs.encode", "torch.Size", "torch.storage.UntypedStorage",
        "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
    }
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or (name.endswith("Storage") and isinstance(value, type)):
            names.add(f"torch.{name}")
    return frozenset(names)


# Every callable/class a state dict's pickle may name; anything else is refused unread.
ALLOWED_GLOBALS = _allowed()
# A file holds at most this many pickles in the legacy format (magic, protocol, sys info,
# the object, storage keys).
_LEGACY_PICKLES = 5
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


class UnsafePickle(Exception):
    """The pickle names something outside :data:`ALLOWED_GLOBALS` (``.name``), uses a
    mechanism the scan does not follow, or (``.corrupt``) cannot be read far enough to tell;
    ``str()`` is the reason."""

    def __init__(self, reason: str, name: str | None = None, *, corrupt: bool = False):
        super().__init__(reason)
        self.name, self.corrupt = name, corrupt


class _Mark:
    pass


class _Bounded:
    """A stream that refuses, before allocating, a read past its end: a pickle may declare a
    2**63-byte string, and pickletools reads what it is told."""

    def __init__(self, raw, size: int):
        self.raw, self.left = raw, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise UnsafePickle(f"it declares {n} bytes where {self.left} are left", corrupt=True)
        data = self.raw.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.raw.readline(self.left)
        self.left -= len(line)
        return line

    def tell(self) -> int:
        return self.raw.tell()


def scan_pickle(stream) -> list[str]:
    """The globals one pickle (read from ``stream`` up to its STOP) names, each checked."""
    stack: list = []
    memo: dict = {}
    found: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("EXT1", "EXT2", "EXT4"):
                raise UnsafePickle("it calls through the copyreg extension registry")
            if name in _GET_OPS:
                if arg not in memo:
                    raise UnsafePickle("its memo is read before it is written", corrupt=True)
                stack.append(memo[arg])
                continue
            if name in _PUT_OPS or name == "MEMOIZE":
                if not stack:
                    raise UnsafePickle("its memo stores from an empty stack", corrupt=True)
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in ("GLOBAL", "INST"):
                found.append(_check(*str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL":
                if len(stack) < 2 or not all(isinstance(s, str) for s in stack[-2:]):
                    raise UnsafePickle("it imports a name that is not a literal string")
                found.append(_check(stack[-2], stack[-1]))
            _pop(stack, op)
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else None)
            elif name == "MARK":
                stack.append(_Mark())
            else:
                stack.extend([None] * len(op.stack_after))
    except (ValueError, EOFError, IndexError, KeyError, TypeError) as err:
        raise UnsafePickle(f"it is not a readable pickle ({err})", corrupt=True) from None
    return found


def _pop(stack: list, op) -> None:
    """Take what ``op`` consumes off the symbolic stack: through the MARK for mark ops (and the
    container below it: SETITEMS, APPENDS, ADDITEMS), else a fixed count."""
    before = op.stack_before
    if pickletools.markobject in before:
        while stack and not isinstance(stack[-1], _Mark):
            stack.pop()
        if not stack:
            raise UnsafePickle("it pops a MARK that was never pushed", corrupt=True)
        stack.pop()
        below = before.index(pickletools.markobject)
        if len(stack) < below:
            raise UnsafePickle(f"its stack underflows at {op.name}", corrupt=True)
        del stack[len(stack) - below:]
        return
    if len(stack) < len(before):
        raise UnsafePickle(f"its stack underflows at {op.name}", corrupt=True)
    del stack[len(stack) - len(before):]


def _check(module: str, name: str | None = None) -> str:
    full = f"{module}.{name}" if name is not None else module
    if full not in ALLOWED_GLOBALS:
        raise UnsafePickle(f"it imports {full}, not one of the tensor types a state dict "
                           "needs", full)
    return full


def scan_torch_file(path: str | Path) -> list[str]:
    """Check every pickle inside a torch file; returns the globals it names, or raises
    :class:`UnsafePickle` naming the first one outside the allow-list."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return _scan_zip(path)
    if _is_tar(path):
        raise UnsafePickle("it is the legacy tar format of PyTorch 0.1, whose unpickling "
                           "lighten does not check")
    found: list[str] = []
    with path.open("rb") as f:
        size = path.stat().st_size
        for _ in range(_LEGACY_PICKLES):
            found += scan_pickle(_Bounded(f, size - f.tell()))
            if f.tell() >= size:
                break
    return found


def _scan_zip(path: Path) -> list[str]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as err:
        raise UnsafePickle(f"it is not a readable zip archive ({err})", corrupt=True) from None
    found: list[str] = []
    with archive:
        infos = [i for i in archive.infolist() if i.filename.endswith(".pkl")]
        if not infos:
            raise UnsafePickle("its zip archive holds no data.pkl", corrupt=True)
        for info in infos:  # every member, duplicates too: a reader may pick either
            if info.compress_type != zipfile.ZIP_STORED:
                raise UnsafePickle(f"its {info.filename} is compressed, which torch.save "
                                   "never writes")
            if info.flag_bits & 0x1:  # zipfile raises a bare RuntimeError for these
                raise UnsafePickle(f"its {info.filename} is marked encrypted, which torch.save "
                                   "never writes", corrupt=True)
            try:
                with archive.open(info) as member:
                    found += scan_pickle(_Bounded(member, info.file_size))
            except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError,
                    EOFError) as err:  # NotImplementedError: a zip version zipfile lacks
                raise UnsafePickle(f"its {info.filename} is unreadable ({err})",
                                   corrupt=True) from None
    return found


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, ValueError):
        return False
