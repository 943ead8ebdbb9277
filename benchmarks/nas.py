"""``arch.nas`` on Fashion-MNIST: NAS at 50% of ResNet-20's MACs against ResNet-20 uniformly
width-scaled to the same MACs and against ``prune.channels {target_macs: 0.5}``, each trained
with the same budget; the search's wall time and the latency predictor's median error.

    python benchmarks/nas.py [--quick] [--epochs 6] [--train 60000] [--test 10000]
        [--trials 40] [--time-budget 30m] [--proxy-train 5000] [--proxy-epochs 1]
        [--proxy-holdout 1000] [--proxy-batch 64] [--proxy-lr-scale 1] [--init inherit]
        [--runs 40] [--threads 2] [--parts macs latency]
        [--out benchmarks/results]

Training (every contender): the shipped ResNet-20 checkpoint's recipe (SGD 0.1, momentum 0.9,
weight decay 5e-4, cosine, batch 128), ``--epochs`` epochs on ``--train`` images, no
augmentation. ``arch.nas`` searches from the shipped trained ResNet-20 (``--init inherit``, the
step's default: every candidate is a sub-network of it) or from fresh weights (``--init
scratch``); the uniformly width-scaled ResNet-20 is trained twice, from scratch and from the
inherited channels (the NAS space's own reference shape at the budget); ``prune.channels``
(group L2 importance) starts from the shipped model too. All fine-tune the same epochs at
lr 0.1. ``--parts latency`` adds NAS under a measured ORT
latency budget of 0.5x ResNet-20's batch-1 latency (``target_latency: 0.5``). All models of a
table are timed together in interleaved rounds (benchmarks/bench_timing.py). ``--quick``: 2,000
training / 1,000 test images, 0.5 epoch, 4 trials of 512-image proxies (1 epoch, batch 32), 10
timed runs (a smoke run, not a result). Writes ``nas.json`` and ``nas.md`` to ``--out``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_timing  # noqa: E402
from bench_timing import ms_cell, ratio_cell, spread_note, time_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)


def train_config(args):
    from lighten.train import TrainConfig

    return TrainConfig(epochs=args.epochs, lr=0.1, batch_size=128, optimizer="sgd",
                       momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=0)


def accuracy(model, data) -> float:
    from lighten.train import evaluate

    return float(evaluate(model.eval(), data.test))


def shipped():
    from lighten.models import ZOO, load_weights, shipped_checkpoint

    model = ZOO["resnet20"](num_classes=10, input_shape=SHAPE)
    return load_weights(model, shipped_checkpoint("resnet20", "fashion-mnist")).eval()


def start_model(args):
    """What arch.nas searches from: the shipped trained model, or fresh weights."""
    from lighten.models import ZOO

    return shipped() if args.init == "inherit" else ZOO["resnet20"](num_classes=10,
                                                                     input_shape=SHAPE)


def nas_step(args, target: dict) -> dict:
    return {"arch.nas": {**target, "init": args.init, "trials": args.trials,
                         "time_budget": args.time_budget,
                         "proxy": {"epochs": args.proxy_epochs, "train": args.proxy_train,
                                   "holdout": args.proxy_holdout,
                                   "batch_size": args.proxy_batch,
                                   "lr_scale": args.proxy_lr_scale},
                         "predict_latency": True, "latency_runs": args.runs,
                         "finetune": {"epochs": args.epochs}}}


def uniform(data, args, budget_macs: float, *, inherit: bool):
    """ResNet-20 with every width times one factor, the widest at <= budget_macs, trained:
    from scratch, or from the shipped model's most important channels (``inherit``)."""
    from lighten.arch.nas_build import CandidateBuilder, fit_to_budget
    from lighten.arch.nas_space import derive_space
    from lighten.measure import count_macs
    from lighten.models import ZOO
    from lighten.step import StrictModel
    from lighten.train import train

    class Space(StrictModel):  # only the widths: the reference shape, scaled
        widths: list[float] = [1.0]
        expansions: list[float] = [1.0]
        depths: str = "auto"
        kernels: None = None
        blocks: list[str] = ["conv"]
        round_to: int = 4
        ignore: list[str] = []

    model = shipped() if inherit else ZOO["resnet20"](num_classes=10, input_shape=SHAPE)
    example = (torch.zeros(1, *SHAPE),)
    space = derive_space(model, example, Space())
    builder = CandidateBuilder(model, space, example, inherit=inherit)
    ref = space.reference()
    m, scale, _ = fit_to_budget(lambda s: builder(ref, scale=s, meta=True),
                                lambda m: builder.macs(m, ref), budget_macs)
    m = builder(ref, scale=scale, seed=0)
    t0 = time.time()
    train(m, data.train, train_config(args), progress=False)
    return m, {"scale": scale, "train_seconds": time.time() - t0,
               "macs": count_macs(m, SHAPE)}


def run_macs(data, args, work: Path) -> dict:
    from lighten import compress
    from lighten.measure import count_macs, count_params

    base = shipped()
    base_macs = count_macs(base, SHAPE)
    out: dict = {"baseline": {"accuracy": accuracy(base, data), "macs": base_macs,
                              "params": count_params(base)[0]}}
    models = {"ResNet-20 (shipped, 6 epochs x 60k)": base}
    t0 = time.time()
    nas, report = compress(start_model(args), nas_step(args, {"target_macs": 0.5}), data=data,
                           train=train_config(args), workdir=work / "nas-macs")
    s = report.summary
    out["nas"] = {"seconds": time.time() - t0, "summary": s, "layers": report.layers,
                  "notes": report.notes}
    models["arch.nas (50% MACs)"] = nas
    for inherit in (False, True):
        uni, facts = uniform(data, args, 0.5 * base_macs, inherit=inherit)
        out["uniform_inherited" if inherit else "uniform"] = facts
        how = "inherited" if inherit else "scratch"
        models["uniform width x{:.2f} ({})".format(facts["scale"], how)] = uni
    t0 = time.time()
    pruned, prep = compress(shipped(), {"prune.channels": {
        "target_macs": 0.5, "finetune": {"epochs": args.epochs, "lr": 0.1}}}, data=data,
        train=train_config(args))
    out["pruned"] = {"seconds": time.time() - t0}
    models["prune.channels (50% MACs)"] = pruned
    out["rows"] = table_rows(models, data, args, work / "timing-macs", base_macs)
    return out


def run_latency(data, args, work: Path) -> dict:
    from lighten import compress

    t0 = time.time()
    nas, report = compress(start_model(args), nas_step(args, {"target_latency": 0.5}),
                           data=data, train=train_config(args), workdir=work / "nas-latency")
    base = shipped()
    rows = table_rows({"ResNet-20 (shipped)": base, "arch.nas (0.5x latency)": nas}, data,
                      args, work / "timing-latency", None)
    return {"seconds": time.time() - t0, "summary": report.summary, "layers": report.layers,
            "notes": report.notes, "rows": rows}


def table_rows(models: dict, data, args, work: Path, base_macs) -> list[dict]:
    from lighten.backends import get_backend
    from lighten.measure import count_macs, count_params

    be = get_backend("onnxruntime", threads=args.threads)
    xs = data.test.tensors[0][:64]
    rows, compiled = [], []
    for i, (name, m) in enumerate(models.items()):
        rows.append({"model": name, "accuracy": accuracy(m, data),
                     "macs": count_macs(m, SHAPE), "params": count_params(m)[0]})
        compiled.append(be.compile(m.eval(), input_shape=SHAPE, workdir=work / str(i),
                                   sample_inputs=xs))
    rows[0]["_timing"] = time_rows(rows, compiled, runs=args.runs)
    return rows


def _table(rows: list[dict], base_macs) -> list[str]:
    out = ["| model | accuracy | MACs | params | b1 ms | b64 ms | b64 vs first row |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f" ({r['macs'] / base_macs:.0%})" if base_macs else ""
        out.append(f"| {r['model']} | {r['accuracy']:.2%} | {r['macs'] / 1e6:.2f} M{share} | "
                   f"{r['params']:,} | {ms_cell(r, 'latency_ms_b1', 3)} | "
                   f"{ms_cell(r, 'latency_ms_b64')} | {ratio_cell(r, rows[0])} |")
    return out


def _predictor(s: dict) -> str:
    if "predictor_median_error" not in s:
        return "latency predictor: not run"
    return (f"latency predictor (per-layer ORT table + affine fit): median error "
            f"{s['predictor_median_error']:.1%} on {s['predictor_checked']} model(s) it was not "
            f"fitted on; result predicted {s['predicted_ms']:.3f} ms, measured "
            f"{s['measured_ms']:.3f} ms (batch 1)")


def markdown(res: dict, args, machine: str) -> str:
    out = ["# arch.nas on Fashion-MNIST (ResNet-20 space)", "",
           f"`python benchmarks/nas.py {' '.join(args.argv)}` — {machine}", "",
           f"Training: {args.epochs:g} epoch(s) on {args.train:,} images for every contender "
           f"(SGD 0.1, cosine); test accuracy on {args.test:,} images. NAS: {args.trials} "
           f"trials, proxy {args.proxy_epochs:g} epoch(s) on {args.proxy_train:,} images "
           f"(batch {args.proxy_batch}), "
           f"scored on {args.proxy_holdout:,} held-out training images.", ""]
    if "macs" in res:
        r = res["macs"]
        s = r["nas"]["summary"]
        out += ["## Under 50% of ResNet-20's MACs", ""] + _table(r["rows"], r["baseline"]["macs"])
        out += ["", f"- search: {s['trials']} trials in {s['search_seconds']:.0f} s "
                f"({s['search_seconds'] / 60:.1f} min; whole step {r['nas']['seconds']:.0f} s); "
                f"chosen `{s['chosen']}` (proxy accuracy {s['proxy_accuracy']:.2%})",
                f"- {_predictor(s)}",
                f"- uniform width scale {r['uniform']['scale']:.3f}; arch.nas (init "
                f"{args.init}), the inherited uniform model and prune.channels start from the "
                "shipped trained ResNet-20's weights" if args.init == "inherit" else
                f"- uniform width scale {r['uniform']['scale']:.3f}; arch.nas (init scratch) "
                "and the scratch uniform model start from fresh weights, the inherited uniform "
                "model and prune.channels from the shipped trained ResNet-20", "",
                spread_note(r["rows"][0]["_timing"]), ""]
        out += ["Pareto front of the search (proxy accuracy vs MACs):", "",
                "| trial | shape (s: stage, w width, e expansion, d depth) | proxy acc | MACs |",
                "|---|---|---|---|"]
        for row in s["pareto_front"]:
            out.append(f"| trial {row['trial']}{' (chosen)' if row['chosen'] else ''} | "
                       f"{row['shape']} | {row['proxy_accuracy']:.2%} | "
                       f"{(row.get('macs') or 0) / 1e6:.2f} M |")
        out.append("")
    if "latency" in res:
        r = res["latency"]
        s = r["summary"]
        out += ["## Under 0.5x ResNet-20's measured ORT batch-1 latency", ""]
        out += _table(r["rows"], None)
        out += ["", f"- budget {s['budget']:.3f} ms (input {s.get('input_latency_ms', 0):.3f} "
                f"ms); result measured {s.get('measured_ms', float('nan')):.3f} ms: "
                f"{'met' if s.get('budget_met') else 'NOT met'}; search "
                f"{s['search_seconds']:.0f} s; chosen `{s['chosen']}`",
                f"- {_predictor(s)}", "", spread_note(r["rows"][0]["_timing"]), ""]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = bench_timing.bench_parser(__doc__.splitlines()[0], epochs=6.0,
                                       parts=["macs", "latency"], out=RESULTS)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--time-budget", default="30m")
    parser.add_argument("--proxy-train", type=int, default=5000)
    parser.add_argument("--proxy-epochs", type=float, default=1.0)
    parser.add_argument("--proxy-holdout", type=int, default=1000)
    parser.add_argument("--proxy-batch", type=int, default=64)
    parser.add_argument("--proxy-lr-scale", type=float, default=1.0)
    parser.add_argument("--init", choices=["inherit", "scratch"], default="inherit")
    args = bench_timing.parse_bench_args(
        parser, argv, train=2000, test=1000, epochs=0.5, runs=10, trials=4, proxy_train=512,
        proxy_epochs=1, proxy_holdout=256, proxy_batch=32)
    from lighten.data import DataSpec, load_data

    torch.manual_seed(0)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train,
                              limit_test=args.test))
    res: dict = {}
    line = bench_timing.machine_line(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "nas-quick" if args.quick else "nas"
    with tempfile.TemporaryDirectory(prefix="lighten-nas-bench-") as tmp:
        for part, fn in (("macs", run_macs), ("latency", run_latency)):
            if part in args.parts:
                res[part] = fn(data, args, Path(tmp))
                write(res, args, line, stem)  # after each part: a long run keeps what it did
    print((args.out / f"{stem}.md").read_text())


def write(res: dict, args, line: str, stem: str) -> None:
    (args.out / f"{stem}.json").write_text(json.dumps(
        {**res, "args": {k: v for k, v in vars(args).items() if k != "out"}}, indent=1,
        default=str))
    (args.out / f"{stem}.md").write_text(markdown(res, args, line))


if __name__ == "__main__":
    main()
