"""Feed one weights/model file to every command and API that reads one; classify each outcome.

Outcomes: ``refused`` (a LightenError whose message is one line naming the file; the CLI: exit 2
and exactly one ``error:`` line on stderr), ``loaded`` (no error), ``crashed`` (any other
exception, a traceback, a multi-line message). Commands run in this process through
``lighten.cli.main.main``, so a payload that ran would create its canary here and be counted.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lighten.errors import LightenError


@dataclass
class Outcome:
    entry: str
    kind: str  # refused | loaded | crashed
    message: str
    seconds: float


def _api_entries() -> dict[str, Callable[[Path], object]]:
    from lighten.artifact import load_artifact
    from lighten.models import ModelSpec, build_model, load_weights, read_state_dict
    from lighten.models.lenet import lenet5

    return {
        "read_state_dict": lambda p: read_state_dict(p),
        "load_weights": lambda p: load_weights(lenet5(num_classes=10, input_shape=(1, 28, 28)),
                                               p),
        "build_model(weights=)": lambda p: build_model(
            ModelSpec(zoo="lenet5", weights=str(p)), input_shape=(1, 28, 28), num_classes=10),
        "load_artifact": lambda p: load_artifact(p),
    }


def _cli_entries(work: Path) -> dict[str, Callable[[Path], list[str]]]:
    def recipe(p: Path) -> list[str]:
        path = work / "recipe.yaml"
        path.write_text(f"model: {{zoo: lenet5, weights: '{p}'}}\ndata: {{name: digits}}\n"
                        f"steps: []\noutput: '{work / 'run'}'\n")
        return ["run", str(path), "--quiet"]

    return {
        "lighten check --weights": lambda p: ["check", "lenet5", "--weights", str(p)],
        "lighten measure --weights": lambda p: ["measure", "lenet5", "--weights", str(p),
                                                "--data", "digits", "--input-shape", "1,8,8"],
        "lighten analyze --weights": lambda p: ["analyze", "lenet5", "--weights", str(p),
                                                "--sensitivity", "--output",
                                                str(work / "analysis")],
        "lighten export --weights": lambda p: ["export", "lenet5", "--weights", str(p),
                                               "--onnx", str(work / "m.onnx")],
        "lighten measure MODEL": lambda p: ["measure", str(p)],
        "lighten export MODEL": lambda p: ["export", str(p), "--onnx", str(work / "m.onnx")],
        "lighten run (model.weights)": recipe,
    }


def artifact_entries() -> dict[str, Callable[[Path], object]]:
    """What reads a safetensors file or an artifact, for the malformed-file corpus."""
    from reliability.artifacts import skeleton

    from lighten.artifact import describe_artifact, load_artifact
    from lighten.models import load_weights, read_state_dict
    from lighten.models.checkpoint import artifact_manifest

    return {
        "read_state_dict": lambda p: read_state_dict(p),
        "load_weights": lambda p: load_weights(skeleton(), p),
        "load_artifact": lambda p: load_artifact(p),
        "load_artifact(model=)": lambda p: load_artifact(p, model=skeleton()),
        "describe_artifact": lambda p: describe_artifact(p),
        "artifact_manifest": lambda p: artifact_manifest(p),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak` (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset the peak RSS counter (``echo 5 > /proc/self/clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def replay_artifact(path: Path) -> list[tuple[Outcome, int]]:
    """Each artifact entry point on ``path``: (outcome, peak memory above the start in bytes)."""
    found = []
    for name, fn in artifact_entries().items():
        reset_peak()
        before = rss_bytes()
        outcome = _api(name, fn, path)
        found.append((outcome, max(peak_rss_bytes() - before, 0)))
    return found


def entries(work: Path) -> list[str]:
    return [*_api_entries(), *_cli_entries(work)]


def replay(path: Path, work: Path, *, only: set[str] | None = None) -> list[Outcome]:
    """Every entry point (or those in ``only``) on ``path``."""
    work.mkdir(parents=True, exist_ok=True)
    found = []
    for name, fn in _api_entries().items():
        if only is None or name in only:
            found.append(_api(name, fn, path))
    for name, argv in _cli_entries(work).items():
        if only is None or name in only:
            found.append(_cli(name, argv(path), path))
    return found


def _api(name: str, fn, path: Path) -> Outcome:
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            fn(path)
    except LightenError as err:
        text = str(err)
        kind = "refused" if "\n" not in text and text.strip() else "crashed"
        return Outcome(name, kind, text, time.perf_counter() - start)
    except Exception as err:  # what the figures count: anything but our one-line errors
        return Outcome(name, "crashed", f"{type(err).__name__}: {err}",
                       time.perf_counter() - start)
    return Outcome(name, "loaded", "", time.perf_counter() - start)


def _cli(name: str, argv: list[str], path: Path) -> Outcome:
    from lighten.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except BaseException as exc:  # noqa: BLE001 - a crash is what is being counted
            code, text = -1, f"{type(exc).__name__}: {exc}"
            err.write(text)
    seconds = time.perf_counter() - start
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return Outcome(name, "loaded", out.getvalue()[-200:], seconds)
    one_line = (code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
                and "Traceback" not in err.getvalue())
    return Outcome(name, "refused" if one_line else "crashed", "\n".join(lines), seconds)
