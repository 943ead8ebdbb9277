"""Deep Compression (prune -> fine-tune -> cluster -> fine-tune codebooks -> entropy-code) on
Fashion-MNIST: bytes per stage, ratio to the float baseline, accuracy, coded bits vs entropy.

    python benchmarks/deep_compression.py                       # the shipped recipes
    python benchmarks/deep_compression.py recipes/deep_compression_lenet300.yaml ...
    python benchmarks/deep_compression.py --epochs 0.5          # every fine-tune at half length
    python benchmarks/deep_compression.py --quick --out /tmp/dc # tiny settings: a smoke test
    python benchmarks/deep_compression.py benchmarks/recipes/deep-compression-resnet20-fast.yaml \
        --runs 3 --name deep_compression_resnet20               # ResNet-20: ~9 CPU-minutes

Each recipe runs through ``lighten.runner.run_recipe`` exactly as ``lighten run`` does, so every
number is the run's own: bytes are the stage artifacts on disk (dense -> sparse -> clustered ->
coded), accuracy and agreement come from the deployed ONNX file on the Fashion-MNIST test set,
the baseline is the zoo's shipped checkpoint. The coded-streams table lists, for the last stage,
every entropy-coded part (masks, cluster indices, float byte planes) with its coded bits per
symbol against the empirical entropy of its symbols (the Shannon bound of an order-0 code).
``--train N`` fine-tunes on the first N training images; ``--runs`` is the runner's
``latency_runs`` (latency is not tabulated here: LeNets on a shared machine are noise).
Writes ``--name``.{json,md} (default deep_compression) to ``--out`` (default
benchmarks/results/); rows of recipes not run this time are kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

from lighten.provenance import atomic_write_text, describe_machine, machine
from lighten.recipe import parse_recipe
from lighten.runner import run_recipe

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RECIPES = [ROOT / "recipes" / "deep_compression_lenet300.yaml",
           ROOT / "recipes" / "deep_compression_lenet5.yaml",
           HERE / "recipes" / "deep-compression-lenet300-push.yaml",
           HERE / "recipes" / "deep-compression-lenet5-push.yaml",
           HERE / "recipes" / "deep-compression-lenet5-layered.yaml",
           HERE / "recipes" / "deep-compression-lenet300-97.yaml"]


def prepared(path: Path, out: Path, *, epochs: float, train: int | None, runs: int,
             quick: bool):
    """The recipe at ``path`` with every fine-tune's epochs scaled by ``epochs``, the first
    ``train`` training images (and in ``--quick`` 512 test images), written under ``out``."""
    raw = yaml.safe_load(path.read_text())
    for entry in raw["steps"]:
        (_, options), = entry.items()
        if isinstance(options, dict) and isinstance(options.get("finetune"), dict):
            ft = options["finetune"]
            ft["epochs"] = round(ft.get("epochs", 1) * epochs, 4)
    data = dict(raw.get("data", {}))
    if train:
        data["limit_train"] = train
    if quick:
        data["limit_test"] = 512
    raw["data"] = data
    raw["deploy"] = {**raw.get("deploy", {}), "latency_runs": runs}
    raw["measure"] = {**raw.get("measure", {}), "robustness": False}
    raw["output"] = str(out / raw["name"])
    return parse_recipe(raw, source=str(path), base_dir=path.parent)


def summarize(path: Path, result) -> dict:
    """One recipe's rows: bytes and accuracy per stage, the coded streams of the last stage."""
    rows = result.rows
    base = rows[0]
    stages = [{"stage": r["stage"], "bytes": r["bytes"], "accuracy": r["accuracy"],
               "agreement": r.get("agreement"),
               "ratio": round(base["bytes"] / r["bytes"], 2),
               "delta_pts": round(100 * (r["accuracy"] - base["accuracy"]), 2),
               "seconds": r.get("seconds")}
              for r in rows]
    streams, totals = [], {}
    reports = sorted((result.output_dir / "stages").glob("*-encode.entropy.report.json"))
    if reports:
        report = json.loads(reports[-1].read_text())
        totals = {k: report["summary"][k] for k in ("bytes_before", "bytes_after", "model_bytes",
                                                    "entropy_bits", "coded_bits", "streams")}
        streams = [{"tensor": f"{r['module']}.{r['tensor']}#{r['part']}", "kind": r["kind"],
                    "symbols": r["symbols"], "raw_bytes": int(r["before"].split()[-2]),
                    "coded_bits": r["coded_bits"], "entropy_bits": r["entropy_bits"],
                    "model_bytes": r["model_bytes"]}
                   for r in report["layers"] if r["action"] == "encode"]
    artifacts = sorted((result.output_dir / "stages").glob("*.safetensors"))
    if artifacts:  # what the last file spends on its header (manifest) and on its tensors
        raw = artifacts[-1].read_bytes()
        header = 8 + int.from_bytes(raw[:8], "little")
        totals = {**totals, "file_bytes": len(raw), "header_bytes": header}
    kmeans = sorted((result.output_dir / "stages").glob("*-share.kmeans.report.json"))
    summary = json.loads(kmeans[-1].read_text())["summary"] if kmeans else {}
    bits = summary.get("bits")
    if bits and summary.get("bias_bits"):
        bits = {**bits, "biases": summary["bias_bits"]}
    return {"recipe": path.stem, "path": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT)
            else str(path), "steps": [next(iter(s)) for s in yaml.safe_load(
                path.read_text())["steps"]], "bits": bits, "stages": stages,
            "streams": streams, "coding": totals}


def _bits(bits: dict) -> str:
    """A uniform width as one number (ResNet-20 has 22 layers), else the per-layer mapping."""
    widths = set(bits.values())
    return f"{widths.pop()} everywhere" if len(widths) == 1 else str(bits)


def render(results: list[dict], command: str) -> str:
    lines = ["# Deep Compression on Fashion-MNIST", "",
             f"Command: `{command}`  ", f"Machine: {describe_machine(machine())}", "",
             "Bytes are the stage artifacts on disk (one .safetensors file each, manifest "
             "included); × is the float baseline's bytes over the stage's; accuracy is the "
             "deployed ONNX file's on the Fashion-MNIST test set (10,000 images; 512 with "
             "--quick); Δ against the baseline.", ""]
    lines += ["| recipe | stage | bytes | × vs float | accuracy | Δ pts | agreement | step s |",
              "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for s in res["stages"]:
            agree = f"{s['agreement']:.4f}" if s.get("agreement") is not None else "-"
            secs = f"{s['seconds']:,.0f}" if s.get("seconds") and s["stage"] != "baseline" \
                else "-"
            lines.append(f"| {res['recipe']} | {s['stage']} | {s['bytes']:,} | "
                         f"{s['ratio']:.1f}× | {s['accuracy']:.4f} | {s['delta_pts']:+.2f} | "
                         f"{agree} | {secs} |")
    lines += ["", "step s: the step's wall seconds (its fine-tune included) on this shared "
              "machine; indicative only.", ""]
    lines += ["Recipes: " + "; ".join(f"`{r['path']}` ({' → '.join(r['steps'])}"
                                      + (f", bits {_bits(r['bits'])}" if r["bits"] else "")
                                      + ")" for r in results), ""]
    lines += ["## Coded bits against the entropy bound (last stage)", "",
              "Per coded part: its symbols (mask bits, cluster indices, float values whose "
              "byte planes were coded), the bytes it took before coding, the ANS-coded bits per "
              "symbol and the empirical entropy per symbol (n·H of the part's own symbol "
              "counts: the bound of any order-0 code). The counts tables (the models) are "
              "stored in the manifest and counted in the artifact bytes.", ""]
    for res in results:
        if not res["streams"]:
            continue
        c = res["coding"]
        over = c["coded_bits"] / c["entropy_bits"] - 1 if c["entropy_bits"] else 0.0
        header = (f"; the file's {c['file_bytes']:,} bytes hold {c['header_bytes']:,} of "
                  "header (the manifest: edit log, tensor entries, counts tables, digests, "
                  "provenance; zlib + base64)" if "header_bytes" in c else "")
        lines += [f"**{res['recipe']}**: stored tensors {c['bytes_before']:,} → "
                  f"{c['bytes_after']:,} bytes; coded {c['coded_bits']:,} bits vs bound "
                  f"{c['entropy_bits']:,.0f} ({over:+.2%}); counts tables {c['model_bytes']:,} "
                  f"bytes{header}", "",
                  "| part | kind | symbols | bytes before | coded bits/symbol | entropy "
                  "bits/symbol | over bound |", "|---|---|---|---|---|---|---|"]
        for s in res["streams"]:
            n = max(s["symbols"], 1)
            gap = s["coded_bits"] / s["entropy_bits"] - 1 if s["entropy_bits"] else 0.0
            lines.append(f"| {s['tensor']} | {s['kind']} | {s['symbols']:,} | "
                         f"{s['raw_bytes']:,} | {s['coded_bits'] / n:.3f} | "
                         f"{s['entropy_bits'] / n:.3f} | {gap:+.2%} |")
        lines.append("")
    lines += ["Float byte planes: only the planes that code smaller are coded (the exponent "
              "byte); bits/symbol there are per value over the coded planes.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipe files (default: shipped)")
    parser.add_argument("--epochs", type=float, default=1.0,
                        help="scale every fine-tune's epochs by this factor")
    parser.add_argument("--train", type=int, default=None, help="first N training images")
    parser.add_argument("--runs", type=int, default=10, help="latency_runs of each run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 0.02x epochs, 2000 train / 512 test images, 3 runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="deep_compression",
                        help="stem of the result files (e.g. deep_compression_lenet5)")
    parser.add_argument("--workdir", type=Path, default=None, help="run folders (default: tmp)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.runs = 0.02, args.train or 2000, 3
    paths = [p.resolve() for p in args.recipes] or RECIPES
    command = "python benchmarks/deep_compression.py " + shlex.join(sys.argv[1:] if argv is None
                                                                    else argv)
    json_path = args.out / f"{args.name}.json"
    kept = json.loads(json_path.read_text()) if json_path.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        results = []
        for path in paths:
            recipe = prepared(path, work, epochs=args.epochs, train=args.train, runs=args.runs,
                              quick=args.quick)
            result = run_recipe(recipe, overwrite=True, progress=False)
            results.append(summarize(path, result))
            base, last = results[-1]["stages"][0], results[-1]["stages"][-1]
            print(f"{path.stem}: {base['bytes']:,} -> {last['bytes']:,} bytes "
                  f"({last['ratio']:.1f}x), accuracy {last['accuracy']:.4f} "
                  f"({last['delta_pts']:+.2f} pts)", flush=True)
    done = {r["recipe"] for r in results}
    results = [r for r in kept if r["recipe"] not in done] + results
    order = {p.stem: i for i, p in enumerate(RECIPES)}
    results.sort(key=lambda r: order.get(r["recipe"], len(order)))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(results, indent=1))
    atomic_write_text(args.out / f"{args.name}.md", render(results, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
