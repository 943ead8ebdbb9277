"""Why ONNX Runtime's 2-thread int8 timings swing, and what lighten's sessions do about it.

    python benchmarks/ort_spinning.py [--archs mixer shufflenet ...] [--threads 2] [--bursts 20]
        [--batches 1 64] [--tag TAG] [--out DIR]

Two ORT sessions in one process (a model and its int8 twin, as every interleaved timing and
many user pipelines hold them) run alternately in bursts of ``--runs`` calls. ORT's worker
threads spin-wait after a run returns; on a 2-core machine the next session's run then shares
the cores with them. Each setting runs in its own fresh process, for the five int8_architectures
models (float and ``quant.ptq {bits: 8}`` int8 files exported by lighten's ORT backend):

- ``ort default``: spinning on, kept spinning after a run (ORT's defaults);
- ``lighten``: spinning on during a run, stopped when it returns
  (``session.force_spinning_stop``, :data:`lighten.backends.onnxrt.SESSION_CONFIG`);
- ``no spinning``: ``session.intra_op.allow_spinning = 0``.

Per setting: each model's median burst time and IQR over the bursts, the int8/float ratio of
the medians, and how many int8 bursts were "slow" (over 1.3x int8's fastest burst under that
setting). Writes ``ort_spinning[-TAG].{md,json}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SETTINGS = {
    "ort default": {"session.intra_op.allow_spinning": "1",
                    "session.force_spinning_stop": "0"},
    "lighten": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "no spinning": {"session.intra_op.allow_spinning": "0"},
}
SLOW = 1.3  # a burst slower than this times the model's fastest burst is a slow spell


def child(float_path: str, int8_path: str, setting: str, threads: int, batch: int,
          bursts: int, runs: int) -> dict:
    """Alternate bursts of the two sessions opened with ``setting``; per-burst medians (ms)."""
    import onnxruntime as ort

    from lighten.backends.onnxrt import DISABLED_OPTIMIZERS, session_options

    sessions = {}
    for kind, path in (("float", float_path), ("int8", int8_path)):
        opts = session_options(threads)
        for key, value in SETTINGS[setting].items():
            opts.add_session_config_entry(key, value)
        sessions[kind] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=DISABLED_OPTIMIZERS)
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    name = sessions["float"].get_inputs()[0].name
    for session in sessions.values():  # first runs allocate buffers and pick kernels
        for _ in range(5):
            session.run(None, {name: x})
    out: dict[str, list[float]] = {kind: [] for kind in sessions}
    for _ in range(bursts):
        for kind, session in sessions.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, {name: x})
                times.append(time.perf_counter() - start)
            out[kind].append(1e3 * statistics.median(times))
    return out


def summary(bursts: dict[str, list[float]]) -> dict:
    row = {}
    for kind, values in bursts.items():
        v = np.asarray(values)
        row[kind] = {"median": float(np.median(v)),
                     "spread": [float(np.percentile(v, 25)), float(np.percentile(v, 75))],
                     "slow_bursts": int((v > SLOW * v.min()).sum()), "bursts": len(v)}
    row["ratio"] = row["int8"]["median"] / row["float"]["median"]
    return row


def export_pair(name: str, data, work: Path, threads: int, cache: Path) -> tuple[Path, Path]:
    """The architecture's float and int8 ONNX files, as lighten's ORT backend writes them."""
    sys.path.insert(0, str(Path(__file__).parent))
    import int8_architectures as arch

    from lighten import compress
    from lighten.backends import get_backend
    from lighten.target import Target

    model = arch.trained(name, data, epochs=1.0, train_n=8000, cache=cache)
    q, _ = compress(copy.deepcopy(model), {"quant.ptq": {"bits": 8}}, data=data,
                    target=Target.this_machine(threads=threads))
    backend = get_backend("onnxruntime", threads=threads)
    paths = []
    for kind, m in (("float", model), ("int8", q)):
        c = backend.compile(m, input_shape=arch.SHAPE, workdir=work / name / kind,
                            sample_inputs=data.test.tensors[0][:64])
        paths.append(c.onnx_path)
    return paths[0], paths[1]


def markdown(results: dict, args, machine_line: str) -> str:
    lines = [f"# ORT thread spinning and the 2-thread swing ({args.tag or 'latest'})", "",
             f"`{' '.join(['python', 'benchmarks/ort_spinning.py', *sys.argv[1:]])}`", "",
             f"Machine: {machine_line}. {args.threads} threads; each setting in its own fresh "
             f"process; {args.bursts} alternating bursts of {args.runs} runs per model. Cells: "
             "median burst time in ms [IQR over bursts]; slow: int8 bursts over "
             f"{SLOW}x int8's fastest under that setting.", ""]
    for batch in args.batches:
        lines += [f"## batch {batch}", "",
                  "| arch | setting | float ms | int8 ms | int8 / float | slow int8 bursts |",
                  "|---|---|---|---|---|---|"]
        for arch, per_setting in results.items():
            for setting, by_batch in per_setting.items():
                row = by_batch[str(batch)]
                cell = {k: f"{row[k]['median']:.2f} [{row[k]['spread'][0]:.2f}-"
                           f"{row[k]['spread'][1]:.2f}]" for k in ("float", "int8")}
                lines.append(f"| {arch} | {setting} | {cell['float']} | {cell['int8']} | "
                             f"{row['ratio']:.2f} | {row['int8']['slow_bursts']}/"
                             f"{row['int8']['bursts']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+",
                   default=["densenet", "shufflenet", "mobilenetv2", "mixer", "seresnet"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bursts", type=int, default=20)
    p.add_argument("--runs", type=int, default=8, help="runs per burst")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    p.add_argument("--tag", default="")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lighten-int8-arch")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=3, metavar=("FLOAT", "INT8", "SETTING"),
                   help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.threads, args.batch, args.bursts, args.runs)))
        return

    from lighten.data import DataSpec, load_data
    from lighten.provenance import atomic_write_text, describe_machine, machine, versions

    data = load_data(DataSpec(name="fashion-mnist"))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(args.archs):
            float_path, int8_path = export_pair(name, data, Path(tmp), args.threads, args.cache)
            order = list(SETTINGS)[index % 3:] + list(SETTINGS)[:index % 3]  # rotate per arch
            results[name] = {setting: {} for setting in SETTINGS}
            for batch in args.batches:
                for setting in order:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", str(float_path), str(int8_path),
                         setting, "--threads", str(args.threads), "--batch", str(batch),
                         "--bursts", str(args.bursts), "--runs", str(args.runs)],
                        capture_output=True, text=True, check=True)
                    row = summary(json.loads(done.stdout.strip().splitlines()[-1]))
                    results[name][setting][str(batch)] = row
                    print(f"{name} b{batch} {setting}: float {row['float']['median']:.2f} "
                          f"int8 {row['int8']['median']:.2f} ratio {row['ratio']:.2f} slow "
                          f"{row['int8']['slow_bursts']}/{row['int8']['bursts']}", flush=True)
    stem = "ort_spinning" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    m = machine()
    atomic_write_text(args.out / f"{stem}.json", json.dumps(
        {"results": results, "machine": m, "versions": versions(),
         "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        indent=1))
    atomic_write_text(args.out / f"{stem}.md", markdown(results, args, describe_machine(m)))
    print(f"wrote {args.out / stem}.md")


if __name__ == "__main__":
    main()
