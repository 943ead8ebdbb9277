"""Every registered step runs from a recipe, and the saved artifact reloads into a fresh model
whose outputs match the ONNX file that was measured (deployed = measured, after save/load)."""

import textwrap

import numpy as np
import pytest
import torch

from lighten.artifact import load_artifact
from lighten.recipe import load_recipe
from lighten.registry import load_builtin_steps
from lighten.runner import run_recipe

MODELS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Block(16)
        self.block2 = Block(16)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


class TinyTransformer(nn.Module):
    """8x8 image -> 8 tokens of 8 pixels -> one encoder layer -> classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2))  # (B, 8, 32)
        t = self.norm(t + self.attn(t, t, t, need_weights=False)[0])
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def rescnn():
    return ResCNN()


def chain():
    """A forward that is a chain of modules: what the dynamic.* steps cut into segments."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def transformer():
    return TinyTransformer()
'''

STEPS = {
    "prune.magnitude": ("rescnn", "{sparsity: 0.5}"),
    "prune.nm": ("rescnn", "{n: 2, m: 4}"),
    "prune.l1": ("rescnn", "{lam: 1.0e-4, sparsity: 0.5, finetune: {epochs: 1}}"),
    "prune.channels": ("rescnn", "{ratio: 0.3}"),
    "prune.neurons": ("rescnn", "{ratio: 0.3}"),
    "prune.layers": ("rescnn", "{count: 1}"),
    "prune.heads": ("transformer", "{ratio: 0.5}"),
    "quant.ptq": ("rescnn", "{calib_samples: 64}"),
    "quant.dynamic": ("transformer", "{}"),
    "quant.weight_only": ("rescnn", "{bits: 4, method: gptq, calib_samples: 64}"),
    "quant.qat": ("rescnn", "{calib_samples: 64, finetune: {epochs: 1}}"),
    "quant.mixed": ("rescnn", "{budget_bytes: 0.2, calib_samples: 64}"),
    "share.kmeans": ("rescnn", "{bits: 3, finetune: {epochs: 1}}"),
    "encode.entropy": ("rescnn", "{}"),
    "share.pq": ("rescnn", "{codebook_bits: 5, weighted: true, finetune: {epochs: 1}}"),
    "share.channels": ("rescnn", "{count: 3}"),
    "share.tie": ("rescnn", "{finetune: {epochs: 1}}"),
    "distill": ("rescnn", "{student: {width: 0.5}, finetune: {epochs: 1}}"),
    "lowrank.svd": ("rescnn", "{rank: 8, measure_latency: false}"),
    "lowrank.tucker": ("rescnn", "{ranks: 4, measure_latency: false}"),
    "lowrank.cp": ("rescnn", "{rank: 4, measure_latency: false}"),
    "arch.fold": ("rescnn", "{}"),
    "arch.separable": ("rescnn", "{measure_latency: false}"),
    "arch.nas": ("rescnn", "{target_macs: 0.5, trials: 2, proxy: {epochs: 0.5, train: 64, "
                 "holdout: 32}, finetune: {epochs: 1}}"),
    "dynamic.early_exit": ("chain", "{target_macs: 0.5, head: pool, head_epochs: 1}"),
    "dynamic.gating": ("chain", "{target_macs: 0.7, gate_epochs: 1, finetune: {epochs: 1}}"),
    "dynamic.slimmable": ("rescnn", "{widths: [1.0, 0.5], finetune: {epochs: 0.5}}"),
    "dynamic.any_precision": ("rescnn", "{bits: [8, 4, 2], finetune: {epochs: 0.5}}"),
}


# llm.* steps calibrate Hugging Face decoder/encoder blocks: tests/test_llm_quant.py and
# tests/test_llm_sparse.py run each through `lighten run` and lighten.compress
OWN_TESTS = ("llm.",)


def test_every_registered_step_is_covered_here():
    assert {s for s in load_builtin_steps() if not s.startswith(OWN_TESTS)} == set(STEPS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    (root / "models.py").write_text(MODELS)
    return root


@pytest.mark.parametrize("step", sorted(STEPS))
def test_step_runs_and_artifact_matches_deployed_onnx(step, workspace, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("LIGHTEN_CACHE", str(workspace / "cache"))  # one baseline per model
    factory, options = STEPS[step]
    out = workspace / step
    recipe_path = workspace / f"{step}.yaml"
    recipe_path.write_text(textwrap.dedent(f"""
        name: {step}
        model: {{python: models.py:{factory}, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 256, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 2, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - {step}: {options}
    """))
    result = run_recipe(load_recipe(recipe_path), progress=False)
    base, final = result.rows
    assert final["stage"] == step and final["accuracy"] >= 0.0
    assert final["bytes"] > 0 and final["macs"] <= base["macs"]

    model, _ = load_artifact(out / "stages" / f"01-{step}.safetensors")
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reloaded = model(x).numpy()
    session = ort.InferenceSession(str(out / "deploy" / step / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    deployed = session.run(None, {"input": x.numpy()})[0]
    scale = max(1.0, float(np.abs(deployed).max()))
    assert np.abs(reloaded - deployed).max() <= 0.1 * scale
    assert (reloaded.argmax(1) == deployed.argmax(1)).mean() >= 0.9
