"""SIGKILL ``lighten run`` at random moments, resume, and compare with an uninterrupted run.

A kill -9 gives the process no chance to clean up, so what it leaves is what the disk holds at
that instant. After every kill the output folder must hold only complete files (each one the
previous complete version or the new one; atomic writes leave at most a hidden ``.NAME.*.tmp``
or ``*.tmp`` beside them), and ``--resume`` must finish the run to the same result as a run that
was never interrupted: the same metrics.jsonl rows (timing aside) and the same stage artifacts
(every tensor bit for bit, the manifest but its timestamp).

Used by ``tests/test_kill_resume.py`` (a dozen kills, in ``make test``) and
``scripts/kill_anywhere.py`` (50+ kills, ``make reliability``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

MODEL_PY = textwrap.dedent("""
    from torch import nn


    def build(num_classes=4, input_shape=(1, 8, 8)):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
""")

RECIPE = textwrap.dedent("""
    name: kill-anywhere
    model: {{python: net.py:build, input_shape: [1, 8, 8]}}
    data: {{name: synthetic, samples: {samples}, input_shape: [1, 8, 8], num_classes: 4}}
    train: {{epochs: {epochs}, lr: 0.01, batch_size: 32}}
    measure: {{eval_limit: 128}}
    deploy: {{backend: onnxruntime, latency_runs: 3}}
    steps:
      - prune.magnitude: {{sparsity: 0.7, finetune: {{epochs: 2}}}}
      - prune.channels: {{ratio: 0.25, finetune: {{epochs: 2}}}}
      - quant.ptq: {{bits: 8, calib_samples: 64}}
""")

# metrics.jsonl keys that are measurements (time, resident memory), not results: they may differ
TIMING_KEYS = ("latency", "seconds", "peak_memory")  # measured, not computed


@dataclass
class KillReport:
    kills: int = 0  # processes that were still running when killed
    phases: list[str] = field(default_factory=list)  # the last progress line before each kill
    resumes: int = 0
    problems: list[str] = field(default_factory=list)


def write_setup(root: Path, *, samples: int = 4096, epochs: int = 8) -> Path:
    """The model file and recipe of the experiment in ``root``; returns the recipe path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "net.py").write_text(MODEL_PY)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(samples=samples, epochs=epochs))
    return recipe


def _command(recipe: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "lighten.cli", "run", str(recipe), "--output", str(out)]
    return cmd + (["--resume"] if resume else [])


def _env(cache: Path) -> dict[str, str]:
    # one thread: the same arithmetic in every process, whatever else runs on the machine
    return {**os.environ, "LIGHTEN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0"}


def run_uninterrupted(recipe: Path, out: Path, cache: Path) -> float:
    """Run the recipe once without interruption; seconds it took."""
    start = time.monotonic()
    done = subprocess.run(_command(recipe, out, resume=False), env=_env(cache),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - start


def kill_and_resume(recipe: Path, out: Path, cache: Path, *, kills: int, horizon: float,
                    rng: random.Random, report: KillReport) -> None:
    """Start the run, SIGKILL it after a random delay in ``(0.3, horizon)`` seconds, check the
    folder, resume, and so on until ``kills`` kills landed (or the run finished first); then
    let the last resume finish."""
    resume, landed = False, 0
    log = out.parent / f"{out.name}.stderr"
    while True:
        with open(log, "w") as err:
            proc = subprocess.Popen(_command(recipe, out, resume), env=_env(cache),
                                    stdout=subprocess.DEVNULL, stderr=err)
        report.resumes += resume
        try:
            if landed >= kills:
                proc.wait(timeout=900)
            elif rng.random() < 0.15:  # now and then during start-up (imports, run.json)
                proc.wait(timeout=rng.uniform(0.3, 2.0))
            else:  # else at a moment of the work itself: after the first progress line
                _wait_for_output(proc, log, timeout=120)
                proc.wait(timeout=rng.uniform(0.0, horizon))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            landed += 1
            report.kills += 1
            lines = [x for x in log.read_text().splitlines() if x.strip()]
            report.phases.append(lines[-1][:80] if lines else "(starting up)")
            report.problems += [f"after kill {report.kills}: {p}" for p in check_folder(out)]
            # a kill before run.json existed leaves nothing to resume: start again
            resume = (out / "run.json").exists() or (out / "state.json").exists()
            continue
        if proc.returncode != 0:
            tail = log.read_text().strip().splitlines()[-1:]
            report.problems.append(f"run exited {proc.returncode}: {tail}")
        return


def _wait_for_output(proc: subprocess.Popen, log: Path, *, timeout: float) -> None:
    """Until the child has printed its first progress line (start-up is over) or exited."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if log.stat().st_size:
            return
        time.sleep(0.02)


def check_folder(out: Path) -> list[str]:
    """Problems with what a kill left in ``out``: any file that is not complete."""
    from lighten.artifact import load_artifact

    problems = []
    if not out.exists():
        return problems
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.name.endswith(".tmp"):
            continue  # an unfinished atomic write: the temp file, never the target
        rel = path.relative_to(out)
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                for line in path.read_text().splitlines():
                    json.loads(line)
            elif path.suffix == ".safetensors" and rel.parts[0] == "stages":
                load_artifact(path, trust=True)  # the run under test wrote it
            elif path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            problems.append(f"{rel}: {type(exc).__name__}: {str(exc)[:120]}")
    return problems


def result_fingerprint(out: Path) -> dict:
    """What an uninterrupted and a resumed run must share: metrics rows without timing, and
    per stage artifact the hash of every tensor and of the manifest without its timestamp."""
    from safetensors import safe_open

    from lighten.artifact import _read_manifest  # the manifest exactly as stored

    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)})
    stages = {}
    for path in sorted((out / "stages").glob("*.safetensors")):
        digest = hashlib.sha256()
        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                digest.update(key.encode() + str(t.dtype).encode() + t.numpy().tobytes())
        manifest = _read_manifest(path)
        manifest.get("meta", {}).get("provenance", {}).pop("timestamp_utc", None)
        digest.update(json.dumps(manifest, sort_keys=True).encode())
        stages[path.name] = digest.hexdigest()
    return {"rows": rows, "stages": stages}


def kill_anywhere(root: Path, *, kills: int, seed: int = 0) -> tuple[KillReport, list[str]]:
    """The whole experiment in ``root``: one uninterrupted run, then runs killed and resumed
    (each in its own folder, as many as it takes for ``kills`` kills to land), every one
    compared with the first. Returns the report and the mismatches found."""
    recipe = write_setup(root)
    seconds = run_uninterrupted(recipe, root / "reference", root / "cache-reference")
    expected = result_fingerprint(root / "reference")
    rng, report, mismatches = random.Random(seed), KillReport(), []
    chain = 0
    while report.kills < kills:
        out = root / f"killed-{chain}"
        kill_and_resume(recipe, out, root / f"cache-{chain}", kills=kills - report.kills,
                        horizon=seconds, rng=rng, report=report)
        if (out / "metrics.jsonl").exists():
            got = result_fingerprint(out)
            mismatches += [f"{out.name}: {what} differ" for what in ("rows", "stages")
                           if got[what] != expected[what]]
            mismatches += [f"{out.name}: left {p}" for p in leftovers(out)]
            mismatches += [f"{out.name}: {gap}" for gap in unfinished(out)]
        else:
            mismatches.append(f"{out.name}: no metrics.jsonl after the final resume")
        chain += 1
    return report, mismatches


def leftovers(out: Path) -> list[str]:
    """Temp files still in ``out`` after a run finished: resume must not leave any."""
    return [str(p.relative_to(out)) for p in out.rglob("*.tmp")]


def unfinished(out: Path) -> list[str]:
    """What a resumed run that finished still lacks: a kill while the stages were timed or the
    report written must not leave a run that --resume counts as done without them."""
    from lighten.verify import run_finished

    gaps = [] if (out / "report.md").is_file() else ["no report.md"]
    if not run_finished(out):
        gaps.append("checksums.json does not mark the run finished")
    if json.loads((out / "run.json").read_text()).get("status") != "finished":
        gaps.append("run.json status is not 'finished'")
    return gaps
