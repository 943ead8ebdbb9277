"""Fuzz the recipe parser, the artifact reader and the weight loaders with Hypothesis at scale
(`make fuzz`; not part of `make test`).

Each target runs for ``--minutes`` of CPU time (one process, one thread, so it can run at low
priority beside other work and still count its budget honestly): Hypothesis draws
inputs -- byte-level damage to good artifacts and safetensors files, random pickle opcode
streams and damaged torch.save files, random JSON merged into recipes -- and the property is
that every input either loads or raises a LightenError, within 10 s. Failures are shrunk by
Hypothesis and printed; the exit status is the number of failing targets.

    python scripts/fuzz.py --minutes 30                  # every target, 30 min each
    python scripts/fuzz.py --target artifact --minutes 1

Runs add up: benchmarks/results/fuzz.json keeps each run (date, commit, inputs, CPU minutes)
and a target's totals, so a budget can be spent in several sittings.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lighten.errors import LightenError  # noqa: E402

HANG_SECONDS = 10.0
RESULTS = ROOT / "benchmarks" / "results" / "fuzz.json"
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _mutate(data: bytes, edits, cut) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out[:cut % (len(out) + 1)] if cut is not None else out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)
CUT = st.none() | st.integers(0, 1 << 20)


class Target:
    def __init__(self, folder: Path):
        self.folder = folder
        self.examples = 0

    def check(self, fn) -> None:
        """``fn()`` may return or raise a LightenError; anything else, or a hang, fails."""
        self.examples += 1
        start = time.process_time()  # CPU time: a busy-looping input counts, a shared core does not
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except LightenError:
            pass
        elapsed = time.process_time() - start
        if elapsed > HANG_SECONDS:
            raise AssertionError(f"took {elapsed:.1f} CPU s (> {HANG_SECONDS} s)")


def artifact_target(folder: Path):
    from reliability.artifacts import skeleton, tiny_model

    from lighten.artifact import load_artifact, save_artifact
    from lighten.models import load_weights, read_state_dict

    good = folder / "good.safetensors"
    save_artifact(tiny_model(), good, model_spec=None)
    base = good.read_bytes()
    path = folder / "case.safetensors"
    target = Target(folder)

    @given(edits=EDITS, cut=CUT, which=st.integers(0, 2))
    def prop(edits, cut, which):
        path.write_bytes(_mutate(base, edits, cut))
        target.check([lambda: load_artifact(path), lambda: read_state_dict(path),
                      lambda: load_weights(skeleton(), path)][which])

    return target, prop


def manifest_target(folder: Path):
    import json

    from reliability.artifacts import _read_manifest, _with_manifest, tiny_model

    from lighten.artifact import load_artifact, save_artifact

    good = folder / "good.safetensors"
    save_artifact(tiny_model(), good, model_spec=None)
    base, manifest = good.read_bytes(), _read_manifest(good)
    paths = _leaf_paths(manifest)
    path = folder / "case.safetensors"
    target = Target(folder)

    @given(where=st.sampled_from(paths), value=JSON)
    def prop(where, value):
        changed = json.loads(json.dumps(manifest))
        node = changed
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
        path.write_bytes(_with_manifest(base, changed))
        target.check(lambda: load_artifact(path))

    return target, prop


def _leaf_paths(value, prefix=()) -> list[tuple]:
    if isinstance(value, dict):
        return [prefix] * bool(prefix) + [p for k, v in value.items()
                                          for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(value, list):
        return [prefix] + [p for i, v in enumerate(value[:6])
                           for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


def weights_target(folder: Path):
    from reliability.pickles import build_corpus, executed

    from lighten.models import read_state_dict

    hostile = build_corpus(folder / "hostile")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.int8)}, buf)
    zipped = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    bases = [zipped, buf.getvalue(), *[c.path.read_bytes() for c in hostile[::10]]]
    path = folder / "case.pt"
    target = Target(folder)

    @given(base=st.sampled_from(range(len(bases))), edits=EDITS, cut=CUT,
           raw=st.none() | st.binary(max_size=200))
    def prop(base, edits, cut, raw):
        data = b"\x80\x02" + raw if raw is not None else _mutate(bases[base], edits, cut)
        path.write_bytes(data)
        target.check(lambda: read_state_dict(path))
        if executed(hostile):
            raise AssertionError(f"a payload ran: {executed(hostile)}")

    return target, prop


def recipe_target(folder: Path):
    from lighten.recipe import parse_recipe
    from lighten.registry import load_builtin_steps

    steps = sorted(load_builtin_steps())
    base = {"name": "t", "model": {"zoo": "lenet5"}, "data": {"name": "digits"}}
    target = Target(folder)
    keys = st.sampled_from(["model", "data", "train", "deploy", "measure", "steps", "output",
                            "seed", "name"]) | st.text(max_size=6)

    @given(top=st.dictionaries(keys, JSON, max_size=3),
           step=st.lists(st.tuples(st.sampled_from(steps), st.dictionaries(
               st.text(max_size=10), JSON, max_size=3) | JSON), max_size=3))
    def prop(top, step):
        raw = {**base, **top}
        if step:
            raw["steps"] = [{name: options} for name, options in step]
        target.check(lambda: parse_recipe(raw, source="fuzz.yaml", base_dir=folder))

    return target, prop


TARGETS = {"artifact": artifact_target, "manifest": manifest_target,
           "weights": weights_target, "recipe": recipe_target}


def run(name: str, minutes: float) -> tuple[int, float, str | None]:
    """(examples, CPU seconds, failure) for one target; progress is recorded every CPU minute,
    so a run stopped early still counts what it did."""
    run_id = f"{os.getpid()}-{time.time():.0f}"
    with tempfile.TemporaryDirectory() as tmp:
        target, prop = TARGETS[name](Path(tmp))
        fuzz = settings(max_examples=500, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck), print_blob=True)(prop)
        cpu0 = last = time.process_time()
        failure = None
        while time.process_time() - cpu0 < 60 * minutes and failure is None:
            try:
                fuzz()
            except Exception as err:  # noqa: BLE001 - a property failure, shrunk by Hypothesis
                import traceback

                traceback.print_exception(err, file=sys.stderr)  # shrunk input + traceback
                errors = getattr(err, "exceptions", [err])
                failure = " | ".join(f"{type(e).__name__}: {str(e)[:200]}" for e in errors)
            if time.process_time() - last > 60:
                last = time.process_time()
                record(name, run_id, target.examples, last - cpu0, failure)
        cpu = time.process_time() - cpu0
        record(name, run_id, target.examples, cpu, failure)
        return target.examples, cpu, failure


def record(name: str, run_id: str, examples: int, cpu: float, failure: str | None) -> None:
    """Add this run to benchmarks/results/fuzz.json (locked: targets may run in parallel);
    a target's totals are the sum of its runs, each with the commit it fuzzed."""
    import fcntl
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        entry = results.get(name, {})
        runs = [r for r in entry.get("runs", []) if r.get("id") != run_id]
        runs.append({"id": run_id, "date": time.strftime("%Y-%m-%d"), "commit": commit,
                     "inputs": examples, "cpu_minutes": round(cpu / 60, 2), "failure": failure})
        # a failure stands until a later run (on the fixed code) passes; earlier ones are kept
        # as what fuzzing found (each fixed with a test in tests/test_fuzz_regressions.py)
        results[name] = {"inputs": sum(r["inputs"] for r in runs),
                         "cpu_minutes": round(sum(r["cpu_minutes"] for r in runs), 2),
                         "failure": runs[-1]["failure"],
                         "found": [r["failure"] for r in runs[:-1] if r["failure"]],
                         "date": runs[-1]["date"], "runs": runs}
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))  # RELIABILITY.md reads it
        os.replace(tmp, RESULTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="CPU minutes per target")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append",
                        help="run only these (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    failed = 0
    for name in args.target or list(TARGETS):
        examples, cpu, failure = run(name, args.minutes)
        failed += failure is not None
        status = "FAILED " + failure if failure else "0 crashes, 0 hangs > 10 s"
        print(f"{name}: {examples} inputs, {cpu / 60:.1f} CPU-minutes: {status}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
