"""Measure lighten's reliability figures and write RELIABILITY.md (`make reliability`).

Every figure comes from a generated corpus replayed through the real entry points, in this
process (a payload that ran would create its canary here); the same corpora run in `make test`
(tests/test_reliability_*.py). Usage: python scripts/reliability.py [--out RELIABILITY.md]
"""

from __future__ import annotations

import argparse
import collections
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this script's folder would shadow the tests' `reliability` package of the same name
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
MIB = 1 << 20


def hostile_pickles(tmp: Path) -> list[dict]:
    from reliability.pickles import build_corpus, executed
    from reliability.replay import entries, replay

    from lighten.models.pickle_scan import UnsafePickle, scan_torch_file

    cases = build_corpus(tmp / "pickles")
    kinds: collections.Counter = collections.Counter()
    slowest = 0.0
    for case in cases:
        for outcome in replay(case.path, tmp / "work"):
            kinds[outcome.kind] += 1
            slowest = max(slowest, outcome.seconds)
    time.sleep(1)  # asynchronous payloads (Popen) would have written their canary by now
    ran = executed(cases)
    scan_stops = 0
    for case in cases:
        try:
            scan_torch_file(case.path)
        except UnsafePickle:
            scan_stops += 1
    torch_ran = _weights_only_alone(cases)
    live = _live(tmp / "control")
    n_entries = len(entries(tmp / "work"))
    return [
        {"figure": "Hostile pickle weights: every payload through every command and API that "
                   f"reads weights ({n_entries}: `lighten run` model.weights, check/measure/"
                   "analyze/export --weights, measure/export MODEL, read_state_dict, "
                   "load_weights, build_model, load_artifact)",
         "cases": f"{len(cases)} files x {n_entries} = {len(cases) * n_entries}",
         "result": f"executed {len(ran)}, crashed {kinds['crashed']}, loaded "
                   f"{kinds['loaded']}, refused in one line {kinds['refused']}; slowest "
                   f"{slowest:.2f} s",
         "command": "pytest tests/test_reliability_pickles.py"},
        {"figure": "... the corpus is live: payloads that run under a plain "
                   "torch.load(weights_only=False) (child process)",
         "cases": str(len(cases)), "result": f"{live} of {len(cases)} run (the rest: "
                                             "malformed on purpose)",
         "command": "pytest tests/test_reliability_pickles.py -k live"},
        {"figure": "... each barrier alone: the opcode scan (lighten/models/pickle_scan.py) / "
                   "torch's weights_only unpickler",
         "cases": str(len(cases)),
         "result": f"scan refuses {scan_stops} of {len(cases)}; weights_only alone executes "
                   f"{torch_ran}",
         "command": "pytest tests/test_reliability_pickles.py -k barrier"},
    ]


def _weights_only_alone(cases) -> int:
    import torch
    from reliability.pickles import executed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            try:
                torch.load(case.path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - refusing is the expected outcome
                pass
    time.sleep(1)
    return len(executed(cases))


def _live(folder: Path) -> int:
    """Positive control, in a child process: how many payloads run when nothing stops them."""
    from reliability.pickles import build_corpus, executed

    cases = build_corpus(folder)
    code = ("import sys, warnings, torch\nwarnings.simplefilter('ignore')\n"
            "for p in sys.argv[1:]:\n    try:\n        torch.load(p, weights_only=False)\n"
            "    except BaseException:\n        pass\n")
    subprocess.run([sys.executable, "-c", code, *[str(c.path) for c in cases]],
                   capture_output=True, timeout=600, check=False)
    time.sleep(1)
    return len(executed(cases))


def malformed(tmp: Path) -> list[dict]:
    from reliability.artifacts import build_corpus
    from reliability.replay import artifact_entries, replay_artifact, reset_peak

    cases = build_corpus(tmp / "malformed")
    measured = reset_peak()
    kinds: collections.Counter = collections.Counter()
    slowest, worst_over, nonfinite, nonfinite_refused = 0.0, -1 << 62, 0, 0
    for name, path in cases:
        size = path.stat().st_size
        for outcome, peak in replay_artifact(path):
            kinds[outcome.kind] += 1
            slowest = max(slowest, outcome.seconds)
            worst_over = max(worst_over, peak - size)
            if name.startswith("weights-") and outcome.entry.startswith("load_") and (
                    name.endswith("/artifact") or outcome.entry == "load_weights"):
                nonfinite += 1
                nonfinite_refused += outcome.kind == "refused"
    n_entries = len(artifact_entries())
    memory = (f"peak memory at most file size + {max(worst_over, 0) / MIB:.1f} MiB"
              if measured else "peak memory not measured (/proc/self/clear_refs refused)")
    return [
        {"figure": "Malformed safetensors files and artifacts (header length past the end or "
                   "huge, non-JSON headers, overlapping / gapped / out-of-range offsets, dtype x "
                   "shape != bytes, duplicate keys, trailing bytes, truncation, bit flips, "
                   "manifests that lie about encodings, dtypes, shapes, bit widths, the blob, "
                   "the edit log (memory bombs), versions, zlib) through read_state_dict, "
                   "load_weights, load_artifact (with and without model=), describe_artifact, "
                   "artifact_manifest",
         "cases": f"{len(cases)} files x {n_entries} = {len(cases) * n_entries}",
         "result": f"crashed {kinds['crashed']} (only LightenErrors), refused "
                   f"{kinds['refused']}, loaded {kinds['loaded']} (a file still valid after "
                   "the change, e.g. a flipped data bit: `lighten verify` finds those; or an "
                   "entry point that only inspects); hangs 0 (slowest "
                   f"{slowest:.2f} s); {memory} (bound: + 64 MiB)",
         "command": "pytest tests/test_reliability_artifacts.py"},
        {"figure": "NaN / Inf weights (artifacts and plain safetensors) loaded into a model",
         "cases": str(nonfinite), "result": f"refused with the parameter named: "
                                            f"{nonfinite_refused} of {nonfinite}",
         "command": "pytest tests/test_reliability_artifacts.py -k nonfinite"},
    ]


def verify_figures(tmp: Path) -> list[dict]:
    import torch
    from torch import nn

    from lighten.artifact import save_artifact
    from lighten.errors import CheckpointError
    from lighten.verify import verify_artifact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    model.register_buffer("big", torch.randn(257))
    path = tmp / "flip.safetensors"
    save_artifact(model, path, model_spec=None,
                  meta={"provenance": {"timestamp_utc": "2026-01-01T00:00:00Z"}})
    data = path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]

    def caught(blob: bytes) -> bool:
        path.write_bytes(blob)
        try:
            verify_artifact(path)
        except CheckpointError:
            return True
        return False

    def flips(lo: int, hi: int) -> tuple[int, int]:
        hits = total = 0
        for byte in range(lo, hi):
            for bit in range(8):
                flipped = bytearray(data)
                flipped[byte] ^= 1 << bit
                total += 1
                hits += caught(bytes(flipped))
        return hits, total

    data_hits, data_total = flips(start, len(data))
    head_hits, head_total = flips(0, start)
    cuts = list(range(0, len(data), 7))
    cut_hits = sum(caught(data[:c]) for c in cuts)
    return [
        {"figure": "`lighten verify`: every single-bit flip of a small artifact's data "
                   "section (2 tensor streams)",
         "cases": str(data_total), "result": f"caught {data_hits} of {data_total}",
         "command": "pytest tests/test_reliability_verify.py"},
        {"figure": "... every single-bit flip of its header (safetensors JSON + manifest; not "
                   "promised: the misses are in the save time, kept outside the compressed "
                   "manifest by design, and in unused padding bits of the last compressed "
                   "byte; neither is read on load)",
         "cases": str(head_total), "result": f"caught {head_hits} of {head_total}",
         "command": "make reliability"},
        {"figure": "... truncation at every 7th byte", "cases": str(len(cuts)),
         "result": f"caught {cut_hits} of {len(cuts)}",
         "command": "pytest tests/test_reliability_verify.py -k truncation"},
        {"figure": "... a run folder: a flipped stage bit, a truncated metrics.jsonl, a missing "
                   "and an extra stage file", "cases": "4",
         "result": "each named (checksums.json + each stage's stream digests)",
         "command": "pytest tests/test_reliability_verify.py -k run_folder"},
    ]


def manifest_code(tmp: Path) -> list[dict]:
    """Artifacts whose manifest names code to build the model (``model_spec: {python: ...}``):
    library functions with chosen arguments, and a file shipped beside the artifact. Loaded
    without ``trust`` (and with a skeleton ``model=``): 0 executed, each refused in one line."""
    import subprocess as sp

    from reliability.artifacts import _with_manifest
    from torch import nn

    from lighten.artifact import _read_manifest, load_artifact, save_artifact
    from lighten.errors import LightenError, UntrustedCodeError

    folder = tmp / "manifest_code"
    folder.mkdir()
    victim = folder / "victim"
    victim.mkdir()
    canary = folder / "code.canary"
    (folder / "shipped.py").write_text(f"from pathlib import Path\nPath({str(canary)!r})"
                                       ".write_text('ran')\ndef build(**kw):\n    return None\n")
    good = folder / "good.safetensors"
    save_artifact(nn.Linear(4, 3), good, model_spec={"zoo": "lenet5"}, input_shape=[4],
                  num_classes=3)
    import os
    import shutil

    gadgets = {
        "subprocess.run shell": (f"{sp.__file__}:run", {"args": f"touch {canary}",
                                                          "shell": True}),
        "os.system": (f"{os.__file__}:system", {"command": f"touch {canary}"}),
        "shutil.rmtree": (f"{shutil.__file__}:rmtree", {"path": str(victim)}),
        "file shipped beside the artifact": (str(folder / "shipped.py") + ":build", {}),
        "relative path to the shipped file": ("shipped.py:build", {}),
    }
    refused = executed = other = 0
    for name, (ref, kwargs) in gadgets.items():
        manifest = {**_read_manifest(good), "model_spec": {"python": ref, "kwargs": kwargs,
                                                           "input_shape": [4]}}
        path = folder / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(_with_manifest(good.read_bytes(), manifest))
        for skeleton in (None, nn.Linear(4, 3)):
            try:
                load_artifact(path, model=skeleton)
            except UntrustedCodeError:
                refused += 1
            except LightenError:
                other += 1
            else:
                other += skeleton is None  # a skeleton load runs no code by design
        executed += canary.exists() or not victim.is_dir()
    loads = 2 * len(gadgets)
    return [{"figure": "Artifacts whose manifest names code for the model (subprocess.run with "
                       "shell, os.system, shutil.rmtree on a folder, a .py file shipped beside "
                       "the artifact) loaded without --trust, and with a skeleton model=",
             "cases": f"{len(gadgets)} files x 2 = {loads} loads",
             "result": f"executed {executed}; refused (UntrustedCodeError) {refused}; loaded "
                       f"from the skeleton without running code {loads - refused - other}",
             "command": "pytest tests/test_reliability_manifest_code.py; make reliability"}]


def hostile_onnx(tmp: Path) -> list[dict]:
    from reliability.onnx_paths import build_corpus

    from lighten.backends import get_backend
    from lighten.errors import LightenError

    cases = build_corpus(tmp / "onnx")
    backend = get_backend("onnxruntime", threads=1)
    refused = 0
    for _, path in cases:
        try:
            backend.compile_file(path, input_shape=(4,))
        except LightenError:
            refused += 1
    return [{"figure": "Hostile ONNX: external data at `..`, an absolute path, a symlink, a "
                       "path climbing out of a subfolder, opened with "
                       "OnnxRuntimeBackend.compile_file (the one place lighten opens an ONNX "
                       "file it did not write; onnx 1.23 / onnxruntime 1.32 check the paths)",
             "cases": str(len(cases)), "result": f"refused in one line {refused} of "
                                                 f"{len(cases)}; 0 bytes read outside",
             "command": "pytest tests/test_reliability_onnx.py"},
            {"figure": "`lighten export --onnx PATH` writes PATH and nothing else (no external "
                       "data, no temp file left)", "cases": "1", "result": "1 file written",
             "command": "pytest tests/test_reliability_onnx.py -k export"}]


def strict_recipes() -> list[dict]:
    from reliability.typos import recipe_cases, recipe_misses, step_cases, step_misses

    steps, recipe = step_cases(), recipe_cases()
    missed = step_misses(steps) + recipe_misses(recipe)
    n_steps = len({s for s, _, _ in steps})
    total = len(steps) + len(recipe)
    return [{"figure": f"Strict recipes: one-character typos (deletion, substitution, "
                       f"transposition; 2 of each per key, seeded) of every key of the "
                       f"{n_steps} registered step configs (nested finetune too) and of the "
                       "recipe's blocks",
             "cases": str(total),
             "result": f"refused with the key's path and a fitting 'did you mean': "
                       f"{total - len(missed)} of {total}",
             "command": "pytest tests/test_reliability_recipes.py"}]


def kill_rows(tmp: Path, kills: int = 50) -> list[dict]:
    """kill -9 at random moments of `lighten run`, resumed each time (tests/kill_harness.py)."""
    from collections import Counter

    sys.path.insert(0, str(ROOT))
    from tests.kill_harness import kill_anywhere

    report, mismatches = kill_anywhere(tmp / "kill", kills=kills, seed=0)
    phases = Counter(p.split(":")[0].split(" epoch")[0] for p in report.phases)
    where = ", ".join(f"{n} {name}" for name, n in phases.most_common())
    return [{"figure": "kill -9 of `lighten run` at random moments (start-up, baseline training, "
                       "fine-tuning, calibration, saving, measuring, timing, the report), then "
                       "`--resume`, until the run finishes; compared with a run never "
                       f"interrupted (last progress line before each kill: {where})",
             "cases": f"{report.kills} kills, {report.resumes} resumes",
             "result": f"incomplete files after a kill {len(report.problems)}; resumed runs "
                       f"differing from the uninterrupted one (metrics rows but timing, every "
                       f"tensor, manifests but the save time; temp files left; no report or "
                       f"not marked finished) "
                       f"{len(mismatches)}",
             "command": "python scripts/kill_anywhere.py --kills 50"}]


def clean_minutes(record: dict) -> float:
    """A fuzz target's CPU-minutes on the code as it is: its runs after the last failing one."""
    clean = 0.0
    for run in reversed(record.get("runs", [])):
        if run.get("failure"):
            break
        clean += run["cpu_minutes"]
    return clean


def fuzz_rows() -> list[dict]:
    """What the last `make fuzz` recorded (benchmarks/results/fuzz.json), if it ran."""
    import json

    path = ROOT / "benchmarks" / "results" / "fuzz.json"
    if not path.is_file():
        return []
    rows = []
    for name, r in sorted(json.loads(path.read_text()).items()):
        clean = clean_minutes(r)
        result = ("FAILED: " + r["failure"][:120] if r.get("failure")
                  else f"0 crashes, 0 hangs > 10 s in the {clean:.1f} CPU-min since the last "
                       "failure was fixed" if r.get("found")
                  else "0 crashes, 0 hangs > 10 s")
        if r.get("found"):
            result += (f"; found earlier and fixed ({len(r['found'])}, each a test in "
                       f"tests/test_fuzz_regressions.py): " + " | ".join(
                           f[:90] for f in r["found"]))
        rows.append({"figure": f"Fuzzing ({name}; Hypothesis, scripts/fuzz.py, {r['date']})",
                     "cases": f"{r['inputs']} inputs, {r['cpu_minutes']} CPU-min in "
                              f"{len(r.get('runs', [])) or 1} runs",
                     "result": result, "command": f"make fuzz (python scripts/fuzz.py --target "
                                                  f"{name} --minutes 30)"})
    return rows


def memory_rows(_tmp: Path) -> list[dict]:
    """Training, calibration and evaluation of ResNet-20 under budgets that force smaller
    batches: measured peak resident memory against each budget, and a refusal up front."""
    import torch

    from lighten import compress
    from lighten.data import DataSpec, load_data
    from lighten.memory import (
        MemoryBudgetError,
        PeakMemory,
        memory_budget,
        rss_bytes,
        training_footprint,
    )
    from lighten.models import resnet20
    from lighten.training import TrainConfig, predict, train

    if rss_bytes() is None:
        return []
    data = load_data(DataSpec(name="synthetic", samples=1024, input_shape=[1, 28, 28]))
    torch.manual_seed(0)
    model = resnet20(num_classes=10, input_shape=(1, 28, 28))
    fp = training_footprint(model, data.task.example_inputs)
    phases = {
        "fine-tuning (batch 256)": lambda: train(model, data.train, TrainConfig(
            epochs=0.25, batch_size=256), progress=False),
        "calibration (quant.ptq, 512 samples)": lambda: compress(
            model, {"quant.ptq": {"bits": 8, "calib_samples": 512}}, data=data),
        "evaluation (batch 1024)": lambda: predict(model, data.train, batch_size=1024),
    }
    with memory_budget("1TB"):  # first use (imports, thread pools, kernels) on a few samples
        train(model, data.train, TrainConfig(epochs=0.02, batch_size=8), progress=False)
        predict(model, data.test, batch_size=8)
    lines, worst = [], 0.0
    for name, work in phases.items():
        limit = int((rss_bytes() + fp.at(16)) / 0.95)  # room for ~16 samples at once
        with memory_budget(limit), PeakMemory() as peak:
            work()
        ratio = peak.peak_mb * 2**20 / limit
        worst = max(worst, ratio)
        lines.append(f"{name} {peak.peak_mb:.0f}/{limit / 2**20:.0f} MiB")
    refused = ""
    try:
        with memory_budget(rss_bytes() + 2**20):
            train(model, data.train, TrainConfig(epochs=1, batch_size=256), progress=False)
    except MemoryBudgetError as err:
        refused = str(err).split(";")[0]
    return [{"figure": "Memory budget (--max-memory): ResNet-20 fine-tuning, calibration and "
                       "evaluation under budgets that leave room for ~16 samples at once",
             "cases": f"{len(phases)} phases + 1 budget below what is resident",
             "result": f"peak / budget: {'; '.join(lines)} (worst {worst:.2f}x; bound 1.10x); "
                       f"too small a budget refused before training: \"{refused}\"",
             "command": "pytest tests/test_memory_budget.py; make reliability"}]


def audit_rows() -> list[dict]:
    """The floors check (offline) and what the last `make audit` recorded."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "audit.py")
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    problems = audit.check_floors()
    advisories = sum(len(f) for f in audit.KNOWN_FIXES.values())
    rows = [{"figure": "Dependency floors (pyproject.toml) past every release with a known CVE "
                       f"({', '.join(audit.KNOWN_FIXES)})",
             "cases": f"{advisories} advisories", "result": f"floors too low: {len(problems)}",
             "command": "python scripts/audit.py --floors"}]
    path = ROOT / "benchmarks" / "results" / "audit.json"
    if path.is_file():
        r = json.loads(path.read_text())
        declared = r.get("scope") == "declared"
        rows.append({"figure": "Known vulnerabilities of the installed pins"
                               f"{' that pyproject.toml declares' if declared else ''} "
                               f"(pip-audit, else PyPI's latest-release list; {r['date']})",
                     "cases": f"{r['packages']} pinned packages",
                     "result": f"{r['status']}: {r['detail']}",
                     "command": "python scripts/audit.py"
                                + (" --scope declared" if declared else "")})
    return rows


FUZZ_MINUTES = 30  # the promised CPU-minutes per fuzz target


def not_yet() -> str:
    """The promises not (yet) measured here; fuzzing only while a target is short of its
    CPU-minutes in benchmarks/results/fuzz.json."""
    import json

    path = ROOT / "benchmarks" / "results" / "fuzz.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    short = [f"{name} {r['cpu_minutes']} ({clean_minutes(r):.1f} since its last fix)"
             for name, r in sorted(record.items())
             if r["cpu_minutes"] < FUZZ_MINUTES or clean_minutes(r) < FUZZ_MINUTES]
    items = []
    if short or not record:
        items.append(
            f"- Fuzzing at the promised scale: `make fuzz` runs every target for {FUZZ_MINUTES}"
            " CPU-minutes (recipe\n  parser, artifact bytes, artifact manifests, torch weight "
            "files); runs add up in\n  `benchmarks/results/fuzz.json`. Short of it, in all or "
            "since the target's last\n  fix (CPU-min): "
            + (", ".join(short) if short else "every target (never run)") + ".")
    items += [
        "- A full vulnerability audit: this machine reaches PyPI's package index but not a\n"
        "  vulnerability service (osv.dev does not resolve; PyPI answers 404 for per-release "
        "metadata),\n  so pip-audit looks up nothing here. `scripts/audit.py` falls back to "
        "PyPI's project JSON,\n  which lists the vulnerabilities of each project's latest "
        "release only: pins older than\n  their latest release stay \"not audited\" (counted "
        "in the row above) until a run that reaches\n  a vulnerability service.",
        "- Recipe `python:` files outside the recipe's folder are allowed and listed in run.json\n"
        "  (`code_outside_recipe_folder`): a recipe is code the user chose to run."]
    return "## Not measured yet\n\n" + "\n".join(items) + "\n"


def write(rows: list[dict], out: Path, seconds: float) -> None:
    lines = [
        "# Reliability and security, measured",
        "",
        "Each figure comes from a generated corpus replayed through lighten's real entry points "
        "(the same corpora run in `make test` as `tests/test_reliability_*.py`). Regenerate this "
        f"file with `make reliability` ({seconds:.0f} s here).",
        "",
        "| figure | cases | result | command |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['figure']} | {row['cases']} | {row['result']} | "
                     f"`{row['command']}` |")
    lines += ["", "How the barriers work: `docs/ARCHITECTURE.md`, section *Reliability*.", "",
              not_yet()]
    out.write_text("\n".join(lines))


def refresh_records(out: Path) -> int:
    """Rewrite ``out`` with its measured rows as they are and the record rows redone."""
    import re

    text = out.read_text()
    seconds = float(re.search(r"make reliability` \((\d+) s here\)", text).group(1))
    records = fuzz_rows() + audit_rows()
    redone = {r["figure"].split(" (")[0] for r in records} | {"Known vulnerabilities of the"}
    rows = []
    for line in text.splitlines():
        cells = line.split(" | ")
        if not line.startswith("| ") or len(cells) != 4 or line.startswith(("| figure", "|---")):
            continue
        figure = cells[0][2:]
        if any(figure.startswith(r) for r in redone) or figure.startswith("pip-audit"):
            continue
        rows.append({"figure": figure, "cases": cells[1], "result": cells[2],
                     "command": cells[3].rstrip(" |").strip("`")})
    write(rows + records, out, seconds)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    parser.add_argument("--records-only", action="store_true",
                        help="keep the measured rows of --out; redo only the rows read from "
                             "records (fuzz.json, audit.json, the floors), e.g. after make fuzz")
    args = parser.parse_args()
    if args.records_only:
        return refresh_records(Path(args.out))
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in (hostile_pickles, malformed, verify_figures, manifest_code, hostile_onnx,
                     kill_rows, memory_rows):
            t = time.perf_counter()
            rows += part(Path(tmp))
            print(f"{part.__name__}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows += strict_recipes()
    rows += fuzz_rows()
    rows += audit_rows()
    write(rows, Path(args.out), time.perf_counter() - start)
    for row in rows:
        print(f"{row['result']}  <- {row['figure'][:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
