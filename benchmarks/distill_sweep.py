"""Fast distillation sweeps (issue #12): LeNet-5 from the shipped ResNet-20 on Fashion-MNIST,
the losses' weights, temperature, epochs and the consistent-teaching augmentation swept with the
teacher's logits computed once for all runs.

    python benchmarks/distill_sweep.py --epochs 20 --seeds 0 --holdout 5000 \\
        --augment crop=2 flip=1 mixup=0.2 views=4 -- label hinton:0.5:2 dkd:2:2

A config is ``label``, ``hinton:ALPHA:T`` (``ALPHA T^2 KL + (1 - ALPHA) CE``), ``dkd:BETA:T``
(``CE + TCKD + BETA NCKD``, ramped in over the first quarter of the steps, as the ``distill``
step does), ``dkd_ls:BETA:T`` (the same on z-scored logits), ``hinton_ls:ALPHA:T`` (hinton on
z-scored logits, Sun et al. 2024), ``dist:W:T``
(``CE + W T^2 (inter + intra)`` Pearson relations, DIST) or another method of the step
(``relational:ALPHA:T``: hinton + RKD; with ``--augment views=K`` the teacher's embeddings are
cached per view too; ``attention:ALPHA:T`` / ``hint:ALPHA:T``: hinton + attention transfer /
FitNets, the teacher's matched feature maps cached once in bfloat16; ``--live-teacher`` runs
the teacher every step instead).
Each run is the library's own objective (``lighten.distill.objective.Objective``,
with ``augment`` the step's :class:`~lighten.distill.augment.AugmentConfig`) trained by the
library's loop (``lighten.training.train``: Adam lr 1e-3, cosine, batch 128), a fresh LeNet-5
seeded as ``benchmarks/distill.py`` seeds it. ``--holdout N`` trains on all but the last N
training images and scores on those N (choose settings there, never on the test set); without
it the score is the test set's. Prints the teacher's fit on the training views first, then one
line per run; ``--out FILE`` appends the lines as markdown rows.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def _losses(kind: str, weight: float) -> dict[str, float]:
    """``label``: cross-entropy alone; ``dist``: CE + ``weight`` x DIST; otherwise the distill
    step's method of that name (its knob, alpha or beta, goes through the loss params)."""
    from lighten.distill.step import METHOD_LOSSES

    if kind == "label":
        return {"ce": 1.0}
    if kind == "dist":
        return {"ce": 1.0, "dist": weight}
    return dict(METHOD_LOSSES[kind])


def _augment(items: list[str] | None):
    from lighten.distill.augment import AugmentConfig

    if not items:
        return None
    return AugmentConfig(**dict(item.split("=", 1) for item in items))


def _student(name: str, teacher, example, seed: int):
    """A fresh student, seeded: a zoo name (``lenet5``), ``resnet8`` (the zoo's ResNet-20 with
    one basic block per stage) or ``resnet20xW`` (derived from the teacher at width W,
    re-initialized: the ``distill`` step's ``student: {width: W}``)."""
    from lighten.distill.models import derive_student
    from lighten.models import ZOO
    from lighten.models.resnet import ResNet20

    torch.manual_seed(seed)
    if name == "resnet8":
        return ResNet20(blocks=1)
    if name.startswith("resnet20x"):
        return derive_student(teacher, example[0], width=float(name[9:]), seed=seed)[0]
    return ZOO[name]()


def main(argv=None) -> None:
    from torch.utils.data import Subset

    from lighten.data import DataSpec, load_data
    from lighten.distill.losses import LossParams
    from lighten.distill.objective import Objective
    from lighten.models import ZOO, load_weights, shipped_checkpoint
    from lighten.training import TrainConfig, evaluate, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train", type=int, default=None, help="first N training images")
    parser.add_argument("--holdout", type=int, default=0,
                        help="score on the last N training images (trained on the rest)")
    parser.add_argument("--augment", nargs="*", default=None,
                        help="distill augment keys: crop=2 flip=1 mixup=0.2 views=4")
    parser.add_argument("--student", default="lenet5",
                        help="a zoo name, resnet8, or resnet20xW (the teacher at width W)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true",
                        help="train the student in channels_last (oneDNN's fast CPU layout)")
    parser.add_argument("--live-teacher", action="store_true",
                        help="run the teacher every step instead of caching its outputs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.train))
    train_set, score_set, where = data.train, data.test, "test"
    if args.holdout:
        n = len(data.train)
        train_set = Subset(data.train, range(n - args.holdout))
        score_set = Subset(data.train, range(n - args.holdout, n))
        where = f"held-out last {args.holdout} training images"
    augment = _augment(args.augment)
    teacher = load_weights(ZOO["resnet20"](), shipped_checkpoint("resnet20", "fashion-mnist"))
    teacher.eval()
    print(f"teacher accuracy on the {where}: {evaluate(teacher, score_set):.4f}; augment "
          f"{augment.model_dump() if augment else None}", flush=True)
    steps = math.ceil(args.epochs * math.ceil(len(train_set) / 128))  # dkd ramps over 1/4
    example = (data.train[0][0][None].repeat(2, 1, 1, 1),)
    fitted = False
    for config in args.configs:
        kind, *rest = config.split(":")
        a, t = (float(rest[0]), float(rest[1])) if rest else (0.5, 2.0)
        params = LossParams(temperature=t, alpha=a, dkd_beta=a)
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = _student(args.student, teacher, example, seed)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            start, cpu = time.perf_counter(), time.process_time()
            warmup = math.ceil(0.25 * steps) if kind.startswith("dkd") else 0
            objective = Objective([model], task=data.task, train_set=train_set, example=example,
                                  losses=_losses(kind, a), params=params, teachers=[teacher],
                                  warmup_steps=warmup, cache=not args.live_teacher,
                                  augment=augment)
            if objective.teacher_fit is not None and not fitted:
                print(f"teacher on the training views: {objective.teacher_fit}", flush=True)
                fitted = True
            losses = train(objective.module, objective.dataset,
                           TrainConfig(epochs=args.epochs, lr=1e-3, batch_size=128, seed=seed),
                           task=objective.task, progress=False)
            print(f"{config} seed {seed}: training loss per epoch "
                  f"{' '.join(f'{v:.4f}' for v in losses)}; "
                  f"{time.process_time() - cpu:.0f} CPU s", flush=True)
            objective.close()
            acc = evaluate(model, score_set)
            line = (f"| {config} | {args.epochs:g} | {seed} | {100 * acc:.2f} | "
                    f"{time.perf_counter() - start:.0f} |")
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
