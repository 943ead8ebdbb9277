"""Helpers shared by the lowrank.* tests: artifact round trip, ONNX Runtime check, a tiny recipe
run through the runner (real numerics everywhere; nothing of lighten is mocked)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch

from lighten.artifact import load_artifact, save_artifact


def round_trip(model, spec: dict, num_classes: int, x: torch.Tensor, path: Path):
    """Save ``model`` as an artifact of source ``spec``, reload it, check identical outputs."""
    save_artifact(model, path, model_spec=spec, input_shape=spec["input_shape"],
                  num_classes=num_classes)
    loaded, manifest = load_artifact(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    return loaded, manifest


def runs_on_ort(model, x: torch.Tensor, path: Path) -> float:
    """Export ``model`` (verified by lighten.export), run it on ONNX Runtime; max |diff|."""
    import onnxruntime as ort

    from lighten.export import export_onnx

    export_onnx(model.eval(), path, input_shape=tuple(x.shape[1:]), sample_inputs=x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max())


def run_tiny_recipe(root: Path, step: str, options: str, models_py: str, factory: str,
                    input_shape=(1, 8, 8)):
    """``lighten run`` of baseline -> ``step`` on synthetic data; returns (result, out dir)."""
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    (root / "models.py").write_text(models_py)
    out = root / "out"
    recipe = root / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: {step}
        model: {{python: models.py:{factory}, input_shape: {list(input_shape)}}}
        data: {{name: synthetic, samples: 192, input_shape: {list(input_shape)}, num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - {step}: {options}
    """))
    return run_recipe(load_recipe(recipe), progress=False), out


def check_run(out: Path, step: str, input_shape=(1, 8, 8)) -> list[dict]:
    """The stage reloads and matches the ONNX file that was deployed; returns its layer rows."""
    import onnxruntime as ort

    model, _ = load_artifact(out / "stages" / f"01-{step}.safetensors")
    x = torch.randn(16, *input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reloaded = model(x).numpy()
    session = ort.InferenceSession(str(out / "deploy" / step / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    deployed = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(reloaded - deployed).max() <= 1e-4 * max(1.0, float(np.abs(deployed).max()))
    report = json.loads((out / "stages" / f"01-{step}.report.json").read_text())
    return report["layers"]
