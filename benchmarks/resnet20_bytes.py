"""Bytes of a Deep-Compressed ResNet-20 before any fine-tune: how much sparsity and how many
codebook bits reach 20x fewer bytes (issue 11), and what clustering alone costs in accuracy.

    python benchmarks/resnet20_bytes.py            # 1,000 test images, minutes
    python benchmarks/resnet20_bytes.py --test 10000

The shipped Fashion-MNIST checkpoint is pruned one-shot per layer (``prune.magnitude``,
``scope: layer``), clustered (``share.kmeans`` with ``bias_bits`` and ``float16``: BatchNorm in
float16) and entropy-coded; bytes are the artifact file on disk (no run provenance, which
``lighten run`` adds: ~700 bytes). Accuracy here is before fine-tuning (pruning one-shot costs
most of it; ``recipes/deep_compression_resnet20.yaml`` fine-tunes). Writes
resnet20_bytes.{json,md} to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.8, 0.85])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    from share_pq import _model

    from lighten import compress
    from lighten.artifact import ENTROPY_FLAG, save_artifact
    from lighten.data import DataSpec, load_data
    from lighten.training import evaluate

    data = load_data(DataSpec(name="fashion-mnist", limit_train=512, limit_test=args.test))
    base = _model()
    work = Path(tempfile.mkdtemp(prefix="resnet20-bytes-"))
    shape = dict(model_spec={"zoo": "resnet20"}, input_shape=[1, 28, 28], num_classes=10,
                 task=data.task)
    float_bytes = save_artifact(base, work / "float.safetensors", **shape)
    rows = [{"sparsity": 0.0, "bits": None, "bytes": float_bytes, "ratio": 1.0,
             "accuracy": evaluate(base, data.test, task=data.task)}]
    for sparsity in args.sparsity:
        pruned = base if not sparsity else compress(base, {"prune.magnitude": {
            "sparsity": sparsity, "scope": "layer"}}, data=data)[0]
        for bits in args.bits:
            model, _ = compress(pruned, {"share.kmeans": {"bits": bits, "bias_bits": 4,
                                                          "float16": True}}, data=data)
            setattr(model, ENTROPY_FLAG, True)  # what encode.entropy does
            size = save_artifact(model, work / f"{sparsity}-{bits}.safetensors", **shape)
            rows.append({"sparsity": sparsity, "bits": bits, "bytes": size,
                         "ratio": round(float_bytes / size, 2),
                         "accuracy": evaluate(model, data.test, task=data.task)})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["# ResNet-20 bytes after prune -> cluster -> entropy-code (no fine-tune)", "",
             f"Command: `python benchmarks/resnet20_bytes.py {' '.join(argv or sys.argv[1:])}` "
             f"({args.test} test images; accuracy before any fine-tune).", "",
             "| sparsity (per layer) | weight bits | artifact bytes | × smaller | accuracy |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sparsity']:.0%} | {r['bits'] or 'float'} | {r['bytes']:,} | "
                     f"{r['ratio']}× | {100 * r['accuracy']:.1f}% |")
    lines += ["", "Biases 4-bit clustered, codebooks and BatchNorm float16 (`share.kmeans: "
              "{bias_bits: 4, float16: true}`), every part entropy-coded."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resnet20_bytes.json").write_text(json.dumps(rows, indent=1))
    (args.out / "resnet20_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
