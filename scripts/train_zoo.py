"""Train a zoo model on Fashion-MNIST and ship its weights in lighten/models/weights/.

    python scripts/train_zoo.py lenet5 [--epochs N] [--limit-train N] [--out-dir DIR]

Hyper-parameters are fixed per model (the table below) and the seed is fixed, so a re-run
reproduces the shipped file. Writes ``{model}-fashion-mnist.safetensors`` atomically plus a
``.json`` sidecar with test accuracy, wall time, versions and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from lighten.data import DataSpec, load_data  # noqa: E402
from lighten.models import WEIGHTS_DIR, ZOO  # noqa: E402
from lighten.training import Callback, TrainConfig, evaluate, train  # noqa: E402

SEED = 0
# Chosen to reach the target accuracy in the fewest epochs on a small CPU.
HYPERPARAMS: dict[str, dict] = {
    "lenet5": dict(epochs=12, lr=1e-3, optimizer="adam", batch_size=128),
    "lenet300": dict(epochs=15, lr=1e-3, optimizer="adam", batch_size=128),
    "resnet20": dict(epochs=6, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                     batch_size=128, augment=True),
    "mobilenetv2": dict(epochs=8, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=4e-5,
                        batch_size=128, augment=True),
    "vgg_small": dict(epochs=6, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      batch_size=128, augment=True),
}
TARGETS = {"lenet5": 0.89, "lenet300": 0.88, "resnet20": 0.92, "mobilenetv2": 0.90,
           "vgg_small": 0.90}


class EpochLog(Callback):
    """One flushed line per epoch (and every ``every`` steps) so a nohup log shows progress."""

    def __init__(self, every: int = 100):
        self.every, self.start = every, time.perf_counter()

    def on_step_end(self, model, step, total_steps):
        if step % self.every == 0:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (total_steps - step)
            print(f"step {step}/{total_steps} {elapsed:.0f}s elapsed, ~{eta:.0f}s left",
                  flush=True)

    def on_epoch_end(self, model, epoch):
        print(f"epoch {epoch + 1} done at {time.perf_counter() - self.start:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(HYPERPARAMS))
    parser.add_argument("--epochs", type=float, help="override the table's epochs")
    parser.add_argument("--limit-train", type=int, help="train on the first N images only")
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--progress", action="store_true", help="show a tqdm bar")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a busy CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    hp = dict(HYPERPARAMS[args.model], seed=SEED)
    if args.epochs is not None:
        hp["epochs"] = args.epochs
    cfg = TrainConfig(**hp)
    data = load_data(DataSpec(name="fashion-mnist", limit_train=args.limit_train))
    torch.manual_seed(SEED)
    model = ZOO[args.model](num_classes=data.num_classes, input_shape=data.input_shape)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters())} params, "
          f"{len(data.train)} train images, config {cfg.model_dump()}", flush=True)

    start = time.perf_counter()
    losses = train(model, data.train, cfg, callbacks=[EpochLog()], progress=args.progress)
    train_seconds = time.perf_counter() - start
    accuracy = evaluate(model, data.test)
    print(f"{args.model}: test accuracy {accuracy:.4f} after {train_seconds:.0f}s "
          f"(target {TARGETS[args.model]})", flush=True)

    stem = args.out_dir / f"{args.model}-fashion-mnist"
    size = _save_atomic(model, stem.with_suffix(".safetensors"))
    sidecar = {
        "model": args.model, "data": "fashion-mnist", "test_accuracy": round(accuracy, 4),
        "epochs": cfg.epochs, "seed": SEED, "hyperparameters": cfg.model_dump(),
        "epoch_losses": [round(x, 5) for x in losses], "train_seconds": round(train_seconds, 1),
        "params": sum(p.numel() for p in model.parameters()), "bytes": size,
        "data_transform": data.transform, "limit_train": args.limit_train,
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                   f"{torch.get_num_threads()} torch threads",
        "command": shlex.join(["python", "scripts/train_zoo.py", *sys.argv[1:]]
                              if argv is None else ["python", "scripts/train_zoo.py", *argv]),
    }
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(tmp, stem.with_suffix(".json"))
    print(f"wrote {stem}.safetensors ({size} bytes) and {stem}.json", flush=True)
    return 0


def _save_atomic(model: torch.nn.Module, path: Path) -> int:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={"model": path.stem})
    os.replace(tmp, path)
    return path.stat().st_size


if __name__ == "__main__":
    sys.exit(main())
