"""``arch.nas`` on Fashion-MNIST: NAS at 50% of ResNet-20's MACs against ResNet-20 uniformly
width-scaled to the same MACs and against ``prune.channels {target_macs: 0.5}``, each trained
with the same budget; the search's wall time and the latency predictor's median error.

    python benchmarks/nas.py [--quick] [--epochs 6] [--train 60000] [--test 10000]
        [--trials 40] [--time-budget 30m] [--proxy-train 5000] [--proxy-epochs 1]
        [--proxy-holdout 1000] [--proxy-batch 64] [--proxy-lr-scale 1] [--init inherit]
        [--rerank-top 4] [--rerank-train 20000] [--rerank-epochs 1] [--rerank-holdout 5000]
        [--seeds 1] [--latency-uniform both] [--runs 40] [--threads 2] [--parts macs latency]
        [--out benchmarks/results] [--tag NAME]

Training (every contender): the shipped ResNet-20 checkpoint's recipe (SGD 0.1, momentum 0.9,
weight decay 5e-4, cosine, batch 128), ``--epochs`` epochs on ``--train`` images, no
augmentation. ``arch.nas`` searches from the shipped trained ResNet-20 (``--init inherit``, the
step's default: every candidate is a sub-network of it) or from fresh weights (``--init
scratch``); the uniformly width-scaled ResNet-20 is trained twice, from scratch and from the
inherited channels (the NAS space's own reference shape at the budget); ``prune.channels``
(group L2 importance) starts from the shipped model too. All fine-tune the same epochs at
lr 0.1. ``--parts latency`` adds NAS under a measured ORT
latency budget of 0.5x ResNet-20's batch-1 latency (``target_latency: 0.5``), against the
uniformly narrowed ResNet-20 and prune.channels at the widest setting that *measures* within
that budget (bisection on timings taken together with the shipped model). ``--seeds N`` trains
every trained row N times (NAS: the chosen architecture again, no new search) and reports the
mean: seed noise is 0.1-0.2 points. All models of a
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


def train_config(args, seed: int = 0):
    from lighten.training import TrainConfig

    return TrainConfig(epochs=args.epochs, lr=0.1, batch_size=128, optimizer="sgd",
                       momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=seed)


def accuracy(model, data) -> float:
    from lighten.training import evaluate

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


def deploy_target(args):
    """The step's deployment target: ORT at ``--threads``, the thread count every other timing
    of this script uses (the step's default, all cores, would calibrate its latency table and
    check its budget at another thread count than the table's rows are timed at)."""
    from lighten.target import Target

    return Target.this_machine("onnxruntime", threads=args.threads)


def nas_step(args, target: dict) -> dict:
    return {"arch.nas": {**target, "init": args.init, "trials": args.trials,
                         "time_budget": args.time_budget,
                         "proxy": {"epochs": args.proxy_epochs, "train": args.proxy_train,
                                   "holdout": args.proxy_holdout,
                                   "batch_size": args.proxy_batch,
                                   "lr_scale": args.proxy_lr_scale},
                         "rerank": {"top": args.rerank_top, "train": args.rerank_train,
                                    "epochs": args.rerank_epochs,
                                    "holdout": args.rerank_holdout,
                                    "batch_size": args.proxy_batch,
                                    "lr_scale": args.proxy_lr_scale},
                         "predict_latency": True, "latency_runs": args.runs,
                         "finetune": {"epochs": args.epochs}}}


def uniform_builder(inherit: bool):
    """(build(scale), reference arch, builder): ResNet-20 with every width times one factor,
    fresh or with the shipped model's most important channels (``inherit``)."""
    from lighten.arch.nas_build import CandidateBuilder
    from lighten.arch.nas_space import derive_space
    from lighten.models import ZOO
    from lighten.step import StrictModel

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
    return builder, space.reference()


def uniform(data, args, budget_macs: float | None, *, inherit: bool, scale: float | None = None,
            seed: int = 0):
    """ResNet-20 uniformly width-scaled, the widest at <= budget_macs (or at ``scale``),
    trained from scratch or from the inherited channels."""
    from lighten.arch.nas_build import fit_to_budget
    from lighten.measure import count_macs
    from lighten.training import train

    builder, ref = uniform_builder(inherit)
    if scale is None:
        _, scale, _ = fit_to_budget(lambda s: builder(ref, scale=s, meta=True),
                                    lambda m: builder.macs(m, ref), budget_macs)
    m = builder(ref, scale=scale, seed=seed)
    t0 = time.time()
    train(m, data.train, train_config(args, seed), progress=False)
    return m, {"scale": scale, "train_seconds": time.time() - t0,
               "macs": count_macs(m, SHAPE)}


def nas_again(data, args, summary: dict, seed: int):
    """The architecture arch.nas chose, rebuilt from its start (the shipped model's channels,
    or fresh) and trained again with another seed: the seed noise of the NAS row."""
    from lighten.arch.nas import NASSpaceConfig
    from lighten.arch.nas_build import CandidateBuilder
    from lighten.arch.nas_space import derive_space
    from lighten.training import train

    model = start_model(args)
    example = (torch.zeros(1, *SHAPE),)
    space = derive_space(model, example, NASSpaceConfig())
    builder = CandidateBuilder(model, space, example, inherit=args.init == "inherit")
    m = builder(summary["chosen_arch"], scale=summary["chosen_scale"], seed=seed)
    train(m, data.train, train_config(args, seed), progress=False)
    return m


def pruned_again(data, args, config: dict, seed: int):
    from lighten import compress

    return compress(shipped(), config, data=data, train=train_config(args, seed), seed=seed)[0]


def seed_accuracies(data, args, first: float, again) -> list[float]:
    """``first`` (seed 0) and the test accuracy of ``again(seed)`` for seeds 1.."""
    return [first] + [accuracy(again(k), data) for k in range(1, args.seeds)]


def fit_measured(build, lo: float, hi: float, base, data, args, work: Path, ratio=0.5 * 0.98,
                 steps: int = 5) -> tuple[float | None, float]:
    """(largest x in [lo, hi] whose ``build(x)`` measures <= ``ratio`` x ``base``'s batch-1
    ORT latency, timed together in the same rounds, or None; the measured ratio there / at
    ``lo``). Bisection on measurements: a few % of timing noise moves the edge a step. The
    default ratio keeps arch.nas's 2% ``latency_margin`` under 0.5x: the same rule for all."""
    from lighten.backends import get_backend
    from lighten.measure.timing import paired_ratio, time_interleaved

    be = get_backend("onnxruntime", threads=args.threads)
    xs = data.test.tensors[0][:64]
    probes = iter(range(10**6))

    def measured(x: float) -> float:
        i = next(probes)
        compiled = [be.compile(m.eval(), input_shape=SHAPE, workdir=work / f"{i}-{j}",
                               sample_inputs=xs) for j, m in enumerate((base, build(x)))]
        ref, model = time_interleaved(compiled, runs=args.runs, batches=(1,)).stats[1]
        return paired_ratio(model, ref).median  # the same-round ratios: robust to load

    r = measured(hi)
    if r <= ratio:
        return hi, r
    r_lo = measured(lo)
    if r_lo > ratio:
        return None, r_lo
    best = (lo, r_lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        r = measured(mid)
        if r <= ratio:
            lo, best = mid, (mid, r)
        else:
            hi = mid
    return best


def run_macs(data, args, work: Path) -> dict:
    from lighten import compress
    from lighten.measure import count_macs, count_params

    base = shipped()
    base_macs = count_macs(base, SHAPE)
    out: dict = {"baseline": {"accuracy": accuracy(base, data), "macs": base_macs,
                              "params": count_params(base)[0]}}
    models = {"ResNet-20 (shipped, 6 epochs x 60k)": base}
    again: dict = {}
    t0 = time.time()
    nas, report = compress(start_model(args), nas_step(args, {"target_macs": 0.5}), data=data,
                           train=train_config(args), workdir=work / "nas-macs",
                           target=deploy_target(args))
    s = report.summary
    out["nas"] = {"seconds": time.time() - t0, "summary": s, "layers": report.layers,
                  "notes": report.notes}
    models["arch.nas (50% MACs)"] = nas
    again["arch.nas (50% MACs)"] = lambda k: nas_again(data, args, s, k)
    for inherit in (False, True):
        uni, facts = uniform(data, args, 0.5 * base_macs, inherit=inherit)
        out["uniform_inherited" if inherit else "uniform"] = facts
        how = "inherited" if inherit else "scratch"
        name = "uniform width x{:.2f} ({})".format(facts["scale"], how)
        models[name] = uni
        again[name] = (lambda k, i=inherit, sc=facts["scale"]:
                       uniform(data, args, None, inherit=i, scale=sc, seed=k)[0])
    t0 = time.time()
    prune = {"prune.channels": {"target_macs": 0.5,
                                "finetune": {"epochs": args.epochs, "lr": 0.1}}}
    pruned, prep = compress(shipped(), prune, data=data, train=train_config(args))
    out["pruned"] = {"seconds": time.time() - t0}
    models["prune.channels (50% MACs)"] = pruned
    again["prune.channels (50% MACs)"] = lambda k: pruned_again(data, args, prune, k)
    out["rows"] = table_rows(models, data, args, work / "timing-macs", base_macs)
    add_seeds(out["rows"], again, data, args)
    return out


def add_seeds(rows: list[dict], again: dict, data, args) -> None:
    """Each trained row's accuracy over ``--seeds`` trainings (the same start, other seeds)."""
    if args.seeds < 2:
        return
    for r in rows:
        if r["model"] in again:
            t0 = time.time()
            r["seed_accuracies"] = seed_accuracies(data, args, r["accuracy"], again[r["model"]])
            r["seeds_seconds"] = time.time() - t0


def run_latency(data, args, work: Path) -> dict:
    """NAS under 0.5x the shipped ResNet-20's batch-1 ORT latency, against the uniformly
    narrowed ResNet-20 and prune.channels each at the widest setting that *measures* within
    the same budget (timed together with the shipped model: bisection on the width scale, or
    on prune.channels' target_macs with channels in multiples of 4 as the search's)."""
    from lighten import compress
    from lighten.prune.structured import ChannelPruneConfig, prune_channels_

    t_all = t0 = time.time()
    nas, report = compress(start_model(args), nas_step(args, {"target_latency": 0.5}),
                           data=data, train=train_config(args), workdir=work / "nas-latency",
                           target=deploy_target(args))
    s = report.summary
    out: dict = {"seconds": time.time() - t0, "summary": s, "layers": report.layers,
                 "notes": report.notes, "contenders": {}}
    base = shipped()
    models = {"ResNet-20 (shipped)": base, "arch.nas (0.5x latency)": nas}
    again: dict = {"arch.nas (0.5x latency)": lambda k: nas_again(data, args, s, k)}
    builder, ref = uniform_builder(True)
    t0 = time.time()
    scale, r = fit_measured(lambda x: builder(ref, scale=x), 0.1, 1.0, base, data, args,
                            work / "fit-uniform")
    out["contenders"]["uniform"] = {"scale": scale, "measured_ratio": r,
                                    "fit_seconds": time.time() - t0}
    if scale is not None:
        for inherit in (False, True)[args.latency_uniform == "inherited":]:
            uni, _ = uniform(data, args, None, inherit=inherit, scale=scale)
            name = "uniform width x{:.2f} ({})".format(scale, "inherited" if inherit
                                                       else "scratch")
            models[name] = uni
            again[name] = (lambda k, i=inherit: uniform(data, args, None, inherit=i,
                                                        scale=scale, seed=k)[0])

    def pruned_at(macs: float):
        m = shipped()
        prune_channels_(m, ChannelPruneConfig(target_macs=macs, round_to=4),
                        torch.zeros(1, *SHAPE))
        return m

    t0 = time.time()
    macs, r = fit_measured(pruned_at, 0.05, 0.6, base, data, args, work / "fit-prune")
    out["contenders"]["prune"] = {"target_macs": macs, "measured_ratio": r,
                                  "fit_seconds": time.time() - t0}
    if macs is not None:
        prune = {"prune.channels": {"target_macs": macs, "round_to": 4,
                                    "finetune": {"epochs": args.epochs, "lr": 0.1}}}
        name = f"prune.channels (target_macs {macs:.3f}, round_to 4)"
        models[name] = compress(shipped(), prune, data=data, train=train_config(args))[0]
        again[name] = lambda k: pruned_again(data, args, prune, k)
    out["rows"] = table_rows(models, data, args, work / "timing-latency", None)
    add_seeds(out["rows"], again, data, args)
    out["seconds_all"] = time.time() - t_all
    return out


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


def _seeds_cell(r: dict) -> str:
    accs = r.get("seed_accuracies")
    if not accs:
        return "—"
    return f"{sum(accs) / len(accs):.2%} ({', '.join(f'{a:.2%}' for a in accs)})"


def _table(rows: list[dict], base_macs) -> list[str]:
    seeds = any("seed_accuracies" in r for r in rows)
    out = ["| model | accuracy | " + ("mean over seeds (each) | " if seeds else "")
           + "MACs | params | b1 ms | b1 vs first row | b64 ms | b64 vs first row |",
           "|---|---|---|---|---|---|---|---|" + ("---|" if seeds else "")]
    for r in rows:
        share = f" ({r['macs'] / base_macs:.0%})" if base_macs else ""
        out.append(f"| {r['model']} | {r['accuracy']:.2%} | "
                   + (f"{_seeds_cell(r)} | " if seeds else "")
                   + f"{r['macs'] / 1e6:.2f} M{share} | {r['params']:,} | "
                   f"{ms_cell(r, 'latency_ms_b1', 3)} | "
                   f"{ratio_cell(r, rows[0], 'latency_ms_b1')} | "
                   f"{ms_cell(r, 'latency_ms_b64')} | {ratio_cell(r, rows[0])} |")
    return out


def _finalists(s: dict) -> list[str]:
    rows = s.get("finalists") or []
    if not rows:
        return []
    out = ["Finalists (successive halving: the short proxy's best and the model's own shape, "
           "trained again on more images):", "",
           "| trial | shape | width scale | proxy acc | longer proxy acc | measured b1 ms |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        tag = (" (chosen)" if r["trial"] == s["chosen_trial"] else "") + (
            " (uniform)" if r.get("enqueued") else "")
        ms = "—" if r.get("measured_ms") is None else (
            f"{r['measured_ms']:.3f} (input {r['input_measured_ms']:.3f})"
            + ("" if r.get("within_budget") else " over"))
        out.append(f"| {r['trial']}{tag} | {r['describe']} | {r['scale']:.3f} | "
                   f"{r['proxy_accuracy']:.2%} | {r['rerank_accuracy']:.2%} | {ms} |")
    return out + [""]


def _predictor(s: dict) -> str:
    if s.get("predictor_median_error") is None:
        return "latency predictor: not run"
    ratio = ("" if s.get("predictor_ratio_error") is None else
             f" and {s['predictor_ratio_error']:.1%} as a fraction of the input model's time "
             f"(timed in the same rounds; the input model measured {s['input_latency_ms']:.3f} "
             f"ms at calibration, {s['input_check_ms']:.3f} ms at the check: the machine's "
             "load moves ms, not fractions)")
    return (f"latency predictor (per-layer ORT table + affine fit): median error "
            f"{s['predictor_median_error']:.1%} in ms{ratio} on {s['predictor_checked']} "
            f"model(s) it was not fitted on; result predicted {s['predicted_ms']:.3f} ms, "
            f"measured {s['measured_ms']:.3f} ms (batch 1)")


def _seeds_note(args) -> list[str]:
    if args.seeds < 2:
        return ["Each row trained once (seed 0): differences of 0.1-0.2 points are within seed "
                "noise.", ""]
    return [f"Mean over seeds: each trained row trained {args.seeds} times from the same start "
            "(seeds 0..), the first being the row timed; NAS's reruns rebuild the chosen "
            "architecture (no new search).", ""]


def markdown(res: dict, args, machine: str) -> str:
    out = ["# arch.nas on Fashion-MNIST (ResNet-20 space)", "",
           f"`python benchmarks/nas.py {' '.join(args.argv)}` — {machine}", "",
           f"Training: {args.epochs:g} epoch(s) on {args.train:,} images for every contender "
           f"(SGD 0.1, cosine); test accuracy on {args.test:,} images. NAS: {args.trials} "
           f"trials, proxy {args.proxy_epochs:g} epoch(s) on {args.proxy_train:,} images "
           f"(batch {args.proxy_batch}), "
           f"scored on {args.proxy_holdout:,} held-out training images; then the "
           f"{args.rerank_top} best and the model's own shape at the budget trained "
           f"{args.rerank_epochs:g} epoch(s) on {args.rerank_train:,} images, scored on "
           f"{args.rerank_holdout:,} held-out training images (the pick).", ""]
    if "macs" in res:
        r = res["macs"]
        s = r["nas"]["summary"]
        out += ["## Under 50% of ResNet-20's MACs", ""] + _table(r["rows"], r["baseline"]["macs"])
        out += ["", f"- search: {s['trials']} trials in {s['study_seconds']:.0f} s, then "
                f"{len(s.get('finalists') or [])} finalists re-scored: "
                f"{s['search_seconds']:.0f} s in all "
                f"({s['search_seconds'] / 60:.1f} min; whole step {r['nas']['seconds']:.0f} s); "
                f"chosen `{s['chosen']}` at width scale {s['chosen_scale']:.3f} (proxy "
                f"accuracy {s['proxy_accuracy']:.2%}"
                + (f", longer proxy {s['rerank_accuracy']:.2%})"
                   if s.get('rerank_accuracy') is not None else ")"),
                f"- {_predictor(s)}",
                f"- uniform width scale {r['uniform']['scale']:.3f}; arch.nas (init "
                f"{args.init}), the inherited uniform model and prune.channels start from the "
                "shipped trained ResNet-20's weights" if args.init == "inherit" else
                f"- uniform width scale {r['uniform']['scale']:.3f}; arch.nas (init scratch) "
                "and the scratch uniform model start from fresh weights, the inherited uniform "
                "model and prune.channels from the shipped trained ResNet-20", "",
                spread_note(r["rows"][0]["_timing"]), ""] + _seeds_note(args)
        out += _finalists(s)
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
        c = r.get("contenders", {})
        out += ["", f"- the step's own check: result measured "
                f"{s.get('measured_ms', float('nan')):.3f} ms, the input model "
                f"{s.get('input_check_ms', float('nan')):.3f} ms in the same rounds: budget "
                f"{s.get('budget_check_ms', float('nan')):.3f} ms "
                f"{'met' if s.get('budget_met') else 'NOT met'} (search budget "
                f"{s['budget']:.3f} ms from the calibration timing); search "
                f"{s['study_seconds']:.0f} s + finalists = {s['search_seconds']:.0f} s "
                f"({s['search_seconds'] / 60:.1f} min); chosen `{s['chosen']}` at width scale "
                f"{s['chosen_scale']:.3f}",
                f"- {_predictor(s)}"]
        for key, what, knob in (("uniform", "uniform width", "scale"),
                                ("prune", "prune.channels (round_to 4)", "target_macs")):
            if key in c:
                v = c[key]
                out.append(f"- {what}: " + (
                    f"{knob} {v[knob]:.3f} is the widest measured within 0.5x (at "
                    f"{v['measured_ratio']:.2f}x when fitted)" if v[knob] is not None else
                    f"none meets 0.5x: at the smallest {knob} tried it measured "
                    f"{v['measured_ratio']:.2f}x") + f" (fit {v['fit_seconds']:.0f} s)")
        out += ["", spread_note(r["rows"][0]["_timing"]), ""] + _seeds_note(args)
        out += _finalists(s)
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
    parser.add_argument("--rerank-top", type=int, default=4)
    parser.add_argument("--rerank-train", type=int, default=20000)
    parser.add_argument("--rerank-epochs", type=float, default=1.0)
    parser.add_argument("--rerank-holdout", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=1, help="trainings per contender")
    parser.add_argument("--tag", default="", help="result files nas<-tag>.{md,json}")
    parser.add_argument("--latency-uniform", choices=["both", "inherited"], default="both",
                        help="uniform contenders of the latency part: from scratch and "
                        "inherited, or only inherited (the stronger one in the MACs part)")
    parser.add_argument("--init", choices=["inherit", "scratch"], default="inherit")
    args = bench_timing.parse_bench_args(
        parser, argv, train=2000, test=1000, epochs=0.5, runs=10, trials=4, proxy_train=512,
        proxy_epochs=1, proxy_holdout=256, proxy_batch=32, rerank_top=2, rerank_train=1024,
        rerank_holdout=256)
    from lighten.data import DataSpec, load_data

    torch.manual_seed(0)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train,
                              limit_test=args.test))
    res: dict = {}
    line = bench_timing.machine_line(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("nas-quick" if args.quick else "nas") + (f"-{args.tag}" if args.tag else "")
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
