"""A run's output folder: what a fresh run clears, what ``--resume`` reads back and accepts.

Everything here is about files that outlive one process: the folder must be a folder and not
someone else's files, ``state.json`` says which stages are done (and the recipe and deployment
target they were built with), a resumed recipe may only change what has not run yet, and the
finished stages and the baseline's reference outputs are read back from disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lighten.errors import RecipeError
from lighten.recipe import Recipe
from lighten.target import Target

STATE_VERSION = 1
BASELINE_CHECKPOINT = Path("checkpoints") / "baseline.safetensors"
LOCK_FILE = ".lighten.lock"


def check_output_dir(out: Path) -> None:
    """The output folder (and its stages/) must be a folder or not exist yet: checked before
    any training, so a typo in --output does not cost a baseline run."""
    for path in (out / "stages", out, *out.parents):
        if path.exists() and not path.is_dir():
            raise RecipeError(f"cannot write the run to {out}: {path} is a file, not a folder; "
                              "choose another --output")


def check_not_foreign(out: Path) -> None:
    """A folder with files but no lighten run in it (no state.json / run.json) is not written
    into without --overwrite: its files are someone's work."""
    if not out.is_dir() or (out / "state.json").exists() or (out / "run.json").exists():
        return
    if next((p for p in out.iterdir() if p.name != LOCK_FILE), None) is not None:
        raise RecipeError(f"{out} is not empty and holds no lighten run; choose another "
                          "--output, or pass --overwrite to write the run into it anyway")


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for one run: a second ``lighten run`` or ``--resume`` on the same folder
    is refused instead of writing into it at the same time. An advisory ``flock``, which the
    OS drops when the process ends however it ends, so a killed run leaves no stale lock.
    (Where ``fcntl`` does not exist, Windows, runs are not locked.)"""
    if importlib.util.find_spec("fcntl") is None:
        yield
        return
    new_folders = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(out):
            yield
    finally:
        if new_folders and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            # a run refused before writing anything leaves no folder behind (nor the
            # parents it made: `lighten demo` without its data leaves no empty runs/)
            (out / LOCK_FILE).unlink(missing_ok=True)
            for folder in new_folders:
                if any(folder.iterdir()):
                    break
                folder.rmdir()


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """The advisory lock on ``out``'s lock file, which says who holds it."""
    import fcntl

    with open(out / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RecipeError(f"{out} is in use by another lighten run ({holder}); wait for "
                              "it to finish, or choose another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_resumable(out: Path, state: dict, recipe: Recipe) -> None:
    """Every file --resume reads back exists: the finished stages and the baseline logits."""
    from safetensors import safe_open

    names = (["baseline"] + unique_stage_names(recipe))[:len(state["done"])]
    needed = [out / "stages" / f"{i:02d}-{name}.safetensors" for i, name in enumerate(names)]
    if names:
        needed.append(out / "reference_logits.safetensors")
    for path in needed:
        problem = "is missing" if not path.is_file() else None
        if problem is None:
            try:  # the header covers the whole file: a truncated one fails here, before training
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as err:  # safetensors raises its own error type for a bad header
                problem = f"is truncated or corrupt ({(str(err).splitlines() or [''])[0]})"
        if problem:
            raise RecipeError(f"cannot resume the run in {out}: {path} {problem}; rerun with "
                              "--overwrite to start it again, or into a new --output")
    read_rows(out)  # a damaged metrics.jsonl fails here, before any training


def check_recipe_change(out: Path, state: dict, recipe_dict: dict) -> None:
    """--resume accepts a recipe whose finished part is unchanged (steps may be appended or
    edited after the last finished stage); anything else is refused, naming what changed."""
    old = state.get("recipe")
    changed = [] if isinstance(old, dict) else ["the recipe (this run predates recorded "
                                                 "recipes)"]
    if isinstance(old, dict):
        finished = max(len(state["done"]) - 1, 0)  # steps behind the finished stages
        old_steps, new_steps = old.get("steps", []), recipe_dict.get("steps", [])
        # where the run is written and what it is called change no result
        ignored = {"steps", "output", "name"}
        changed = differences({k: v for k, v in old.items() if k not in ignored},
                               {k: v for k, v in recipe_dict.items() if k not in ignored}, "")
        for i in range(finished):
            mine = new_steps[i] if i < len(new_steps) else "(removed)"
            changed += differences(old_steps[i], mine, f"steps[{i}]")
    if changed:
        more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
        raise RecipeError(f"cannot resume the run in {out}: {'; '.join(changed[:4])}{more} "
                          "changed since it started (steps after the last finished stage may "
                          "change); rerun with --overwrite to replace that run, or without "
                          "--resume into a new --output")


def differences(old, new, where: str) -> list[str]:
    """Dotted paths at which two JSON values differ, as 'path: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            found += differences(old.get(key, "(unset)"), new.get(key, "(unset)"), path)
        return found
    return [] if old == new else [f"{where or 'recipe'}: {old!r} -> {new!r}"]


def prepare_output(out: Path, *, fresh: bool) -> None:
    if fresh:
        for name in ("metrics.jsonl", "state.json", "run.json", "report.md", "report.html",
                     "latency.json", "checksums.json", BASELINE_CHECKPOINT):
            (out / name).unlink(missing_ok=True)
        stages = out / "stages"
        if stages.is_dir():
            for old in [*stages.glob("*.safetensors"), *stages.glob("*.layers.json"),
                        *stages.glob("*.report.json"), *stages.glob("nas-*/study.db")]:
                old.unlink()
    remove_unfinished_writes(out)
    (out / "stages").mkdir(parents=True, exist_ok=True)


def remove_unfinished_writes(out: Path) -> list[Path]:
    """Delete the temp files of writes a killed run never finished (``*.tmp``: an atomic
    write's ``.NAME.*.tmp``, a checkpoint's ``NAME.tmp``); the folder is held by this run
    (:func:`run_lock`), so no other process is writing them. Returns what was removed."""
    removed = [path for path in out.rglob("*.tmp") if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def load_finished(artifact: Path, out: Path) -> tuple[nn.Module, dict]:
    """A finished stage read back for --resume (built from the source its manifest names) and
    that source; a damaged file says how to start over."""
    from lighten.artifact import load_artifact
    from lighten.errors import CheckpointError

    try:
        model, manifest = load_artifact(artifact, trust=True)  # this run's own stage
        return model, manifest["model_spec"]
    except CheckpointError as err:
        reason = str(err).removesuffix("; re-save it")  # a stage is not re-saved by hand
        raise RecipeError(f"cannot resume the run in {out}: {reason}; rerun with --overwrite to "
                          "start it again, or into a new --output") from None


def resumed_target(target: Target, recipe: Recipe, state: dict | None,
                    notes: list[str]) -> Target:
    """``cpu: auto`` resolves to the machine that *started* the run: a run resumed elsewhere
    keeps building for the CPU its finished stages were built for (and says so)."""
    recorded = (state or {}).get("target") or {}
    cpu = recorded.get("cpu")
    if getattr(recipe.deploy, "cpu", "auto") != "auto" or not cpu or cpu == target.cpu:
        return target
    import dataclasses

    notes.append(f"resumed on a {target.cpu} machine; steps keep building for the run's "
                 f"recorded target cpu {cpu} (latency is measured on this machine)")
    return dataclasses.replace(target, cpu=cpu)


def unique_stage_names(recipe: Recipe) -> list[str]:
    return stage_names_of(recipe.steps)


def stage_names_of(steps) -> list[str]:
    """Each step's stage name: its name, with ``#2``, ``#3`` on repeats."""
    names, seen = [], {}
    for step in steps:
        seen[step.name] = seen.get(step.name, 0) + 1
        names.append(step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}")
    return names


def save_reference(out: Path, logits: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = out / "reference_logits.tmp"
    save_file({"logits": logits.contiguous()}, str(tmp))
    os.replace(tmp, out / "reference_logits.safetensors")


def reference_logits(out: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(out / "reference_logits.safetensors"))["logits"]


def read_state(out: Path) -> dict | None:
    path = out / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("done"), list):
        raise RecipeError(f"{path} is corrupt; rerun with --overwrite to start the run again, "
                          "or choose another --output")
    return state if state.get("version") == STATE_VERSION else None


def read_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        rows = None
    if rows is None or not all(isinstance(r, dict) and "stage" in r for r in rows):
        raise RecipeError(f"{path} is corrupt; rerun with --overwrite to start the run again, "
                          "or choose another --output")
    return rows
