"""Every ordered pair of registered steps (and some longer chains), on a CNN and a transformer
given as ``python:`` models.

Each stage is compressed with the one verb (``lighten.compress``), saved as an artifact, and
every artifact is reloaded in a fresh process, from its model_spec alone, and must compute what
the in-memory model computed. A pair that cannot run refuses up front (a quantizing step is a
recipe's last step) or, where the model lacks what a step needs (no attention heads to prune), with
one clear LightenError line; the set of such refusals is pinned here so a new one is noticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _models import CNN, RESIDUAL_BLOCK, model_source
from safetensors.torch import save_file

import lighten
from lighten.artifact import save_artifact
from lighten.data import DataSpec, load_data
from lighten.errors import LightenError, RecipeError
from lighten.recipe import check_step_order
from lighten.registry import load_builtin_steps

MODELS_PY = model_source(RESIDUAL_BLOCK, CNN, textwrap.dedent('''
    class Encoder(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.norm1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))


    class Transformer(nn.Module):
        """Rows of an 8x8 image as 8 tokens."""

        def __init__(self, d=32, heads=4, classes=10):
            super().__init__()
            self.embed = nn.Linear(8, d)
            self.pos = nn.Parameter(torch.zeros(1, 8, d))
            self.blocks = nn.Sequential(Encoder(d, heads), Encoder(d, heads))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            x = self.embed(x.flatten(1, 2)) + self.pos
            return self.head(self.norm(self.blocks(x)).mean(1))


    def transformer():
        return Transformer()
'''))

TUNE = {"epochs": 0.25}
CONFIGS = {
    "prune.magnitude": {"sparsity": 0.5},
    "prune.channels": {"ratio": 0.25},
    "prune.neurons": {"ratio": 0.25},
    "prune.nm": {},
    "prune.l1": {"lam": 1e-4, "sparsity": 0.5, "finetune": TUNE},
    "prune.layers": {"count": 1},
    "prune.heads": {"ratio": 0.5},
    "quant.ptq": {"calib_samples": 32},
    "quant.dynamic": {},
    "quant.weight_only": {"bits": 4, "group_size": 8},
    "quant.qat": {"finetune": TUNE},
    "quant.mixed": {"budget_bytes": 0.5},
    "share.kmeans": {"bits": 3},
    "encode.entropy": {},
    "share.pq": {"codebook_bits": 4},
    "share.channels": {"count": 2},
    "share.tie": {},
    "distill": {"finetune": TUNE},
    "dynamic.early_exit": {"head": "pool", "head_epochs": 0.3},
    "dynamic.gating": {"gate_epochs": 0.3, "finetune": TUNE},
    "dynamic.slimmable": {"widths": [1.0, 0.5], "finetune": TUNE},
    "dynamic.any_precision": {"bits": [8, 4, 2], "finetune": TUNE},
    "lowrank.svd": {"rank": 4, "measure_latency": False},
    "lowrank.tucker": {"ranks": 4, "measure_latency": False},
    "lowrank.cp": {"rank": 4, "measure_latency": False},
    "arch.fold": {},
    "arch.separable": {"measure_latency": False, "calibration_samples": 32},
    "arch.nas": {"target_macs": 0.6, "trials": 1, "proxy": {"epochs": 0.25, "train": 32,
                                                            "holdout": 16},
                 "finetune": TUNE},
}
# The first twelve steps are paired exhaustively; every later step is paired with each of
# REPRESENTATIVE (before and after it) and with every other later step: 29 steps all against
# all would be ~1,700 pairs, too slow for `make test`.
CORE = ("prune.magnitude", "prune.channels", "prune.neurons", "prune.nm", "prune.l1",
        "prune.layers", "prune.heads", "quant.ptq", "quant.dynamic", "quant.weight_only",
        "quant.qat", "quant.mixed")
REPRESENTATIVE = ("prune.magnitude", "prune.channels", "prune.heads", "quant.ptq",
                  "quant.dynamic", "quant.weight_only")
# llm.* steps work block by block on Hugging Face decoder/encoder models: tests/test_llm_*.py
OWN_TESTS = ("llm.",)
# Steps a model lacks the parts for: (model, step) -> a phrase of the one-line refusal.
CHAINS = [
    ("prune.channels", "prune.magnitude", "quant.ptq"),
    ("prune.layers", "prune.neurons", "prune.nm", "quant.dynamic"),
    ("prune.l1", "prune.channels", "quant.qat"),
    ("prune.magnitude", "prune.layers", "quant.weight_only"),
    ("prune.neurons", "prune.channels", "prune.magnitude", "quant.mixed"),
    ("prune.magnitude", "share.kmeans", "quant.weight_only", "encode.entropy"),
]
TRANSFORMER_CHAINS = [
    ("prune.heads", "prune.channels", "prune.neurons", "quant.dynamic"),
    ("prune.channels", "prune.heads", "prune.magnitude", "quant.ptq"),
]
NOT_APPLICABLE = {
    ("cnn", "prune.heads"): "no attention",
    # exits and gates go between the top-level modules of a forward that chains them
    ("transformer", "dynamic.early_exit"): "not a chain of modules",
    ("transformer", "dynamic.gating"): "not a chain of modules",
}
# (first, second) -> a phrase of the one-line refusal of ``second`` after ``first``, on both
# models (a pair that refuses on one model only is keyed (model, first, second)).
FIXED = "run structural steps (prune.channels, share.channels, ...) before"
PAIR_REFUSALS: dict[tuple, str] = {
    **{(first, second): FIXED for first in ("share.pq", "dynamic.early_exit", "dynamic.gating")
       for second in ("prune.channels", "share.channels")},
    **{(first, "arch.nas"): FIXED for first in ("share.pq", "dynamic.early_exit",
                                                "dynamic.gating", "dynamic.slimmable")},
    ("cnn", "share.pq", "quant.dynamic"): "found no nn.Linear",  # PQLinear holds the codes
    ("share.pq", "share.pq"): "already replaced",
    ("dynamic.early_exit", "dynamic.early_exit"): "apply the step once",
    ("dynamic.gating", "dynamic.gating"): "apply it once",
    ("dynamic.early_exit", "dynamic.gating"): "a dynamic step comes last, once",
    ("dynamic.gating", "dynamic.early_exit"): "a dynamic step comes last, once",
    **{(first, "dynamic.any_precision"): "a dynamic step comes last, once"
       for first in ("dynamic.early_exit", "dynamic.gating", "dynamic.slimmable")},
    # dynamic.slimmable: its layers are SlimConv/SlimLinear (every width's weights in one)
    **{("dynamic.slimmable", second): FIXED for second in ("prune.channels", "share.channels")},
    **{(first, "dynamic.slimmable"): FIXED for first in ("share.pq", "dynamic.early_exit",
                                                         "dynamic.gating")},
    ("dynamic.slimmable", "dynamic.slimmable"): "apply the step once",
    ("dynamic.slimmable", "dynamic.early_exit"): "a dynamic step comes last, once",
    ("dynamic.slimmable", "dynamic.gating"): "a dynamic step comes last, once",
    ("cnn", "dynamic.slimmable", "quant.dynamic"): "found no nn.Linear",
    ("cnn", "dynamic.slimmable", "quant.weight_only"): "found no nn.Linear / nn.Conv2d",
    ("cnn", "dynamic.slimmable", "share.pq"): "found no Conv2d/Linear layer",
}


def test_every_registered_step_is_exercised():
    assert set(CONFIGS) == {s for s in load_builtin_steps() if not s.startswith(OWN_TESTS)}


def pairs_to_try() -> dict[str, list[str]]:
    """first step -> the steps tried after it."""
    later = [s for s in sorted(CONFIGS) if s not in CORE]
    after = {s: [] for s in sorted(CONFIGS)}
    for first in CORE:
        after[first] += list(CORE) + [s for s in later if first in REPRESENTATIVE]
    for first in later:
        after[first] += list(REPRESENTATIVE) + later
    return after


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    (root / "models.py").write_text(MODELS_PY)
    data = load_data(DataSpec(name="synthetic", samples=96, input_shape=[1, 8, 8],
                              num_classes=10))
    return root, data


def _compress(model, step, data, seed):
    return lighten.compress(model, {step: CONFIGS[step]}, data=data, seed=seed)[0]


def _refusal(err: LightenError) -> str:
    if isinstance(err, RecipeError) and "cannot follow" not in str(err):
        raise err  # a config of this test that does not validate is the test's bug
    message = str(err)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_every_ordered_pair_runs_or_refuses_and_every_stage_reloads(setting, arch):
    root, data = setting
    spec = {"python": f"{root / 'models.py'}:{arch}", "input_shape": [1, 8, 8]}
    from lighten.models import ModelSpec, build_model

    torch.manual_seed(0)
    base = build_model(ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10).eval()
    x = torch.stack([data.test[i][0] for i in range(8)])
    plan = pairs_to_try()
    jobs, refused = [], {}
    out = root / arch
    out.mkdir()

    def save(model, name):
        path = out / f"{name}.safetensors"
        save_artifact(model, path, model_spec=spec, input_shape=(1, 8, 8), num_classes=10)
        with torch.no_grad():
            expected = model.eval()(x)
        jobs.append((str(path), name))
        return expected

    expected = {}
    for first, seconds in plan.items():
        try:
            one = _compress(base, first, data, seed=1)
        except LightenError as err:
            refused[(arch, first)] = _refusal(err)
            continue
        expected[first] = save(one, first)
        for second in seconds:
            try:
                check_step_order([first, second], where="pairs")
            except RecipeError as err:
                step = lighten.registry.get_step(first)
                assert step.quantizes or step.storage_only
                assert ("cannot follow" if step.quantizes else "must be the last step") in str(err)
                continue
            name = f"{first}+{second}"
            try:
                two = _compress(one, second, data, seed=2)
            except LightenError as err:
                alone = (arch, second)
                refused[alone if alone in NOT_APPLICABLE else (arch, first, second)] = \
                    _refusal(err)
                continue
            expected[name] = save(two, name)
    pinned = {**NOT_APPLICABLE}
    for key, phrase in PAIR_REFUSALS.items():
        key = key if len(key) == 3 else (arch, *key)  # (first, second): on both models
        # a step refused on this model alone is pinned there, not in its pairs
        if key[0] == arch and not {(arch, key[1]), (arch, key[2])} & NOT_APPLICABLE.keys():
            pinned[key] = phrase
    pinned = {k: v for k, v in pinned.items() if k[0] == arch and k[1] in plan}
    unexpected = {k: v for k, v in refused.items() if k not in pinned}
    assert not unexpected, "\n".join(f"{k}: {v}" for k, v in unexpected.items())
    assert refused.keys() == pinned.keys()
    for key, phrase in pinned.items():
        assert phrase in refused[key], (key, refused[key])
    for chain in CHAINS + (TRANSFORMER_CHAINS if arch == "transformer" else []):
        check_step_order(list(chain), where="chains")
        model = base
        for i, step in enumerate(chain):
            model = _compress(model, step, data, seed=10 + i)
            name = "+".join(chain[: i + 1])
            if name not in expected:
                expected[name] = save(model, name)
    save_file({name: t.contiguous() for name, t in expected.items()}, str(out / "expected.st"))
    save_file({"x": x.contiguous()}, str(out / "x.st"))
    _reload_in_fresh_process(out, jobs)


RELOAD_PY = '''
import json, sys
import torch
from safetensors.torch import load_file
from lighten.artifact import load_artifact

out = sys.argv[1]
jobs = json.loads(open(out + "/jobs.json").read())
expected = load_file(out + "/expected.st")
x = load_file(out + "/x.st")["x"]
bad = []
for path, name in jobs:
    model, _ = load_artifact(path, trust=True)  # our models.py; edits replayed
    with torch.no_grad():
        y = model(x)
    diff = (y - expected[name]).abs().max().item()
    if not diff <= 1e-5 * max(1.0, expected[name].abs().max().item()):
        bad.append(f"{name}: max |diff| {diff:.3g}")
print(json.dumps({"checked": len(jobs), "bad": bad}))
'''


def _reload_in_fresh_process(out, jobs) -> None:
    (out / "jobs.json").write_text(json.dumps(jobs))
    (out / "reload.py").write_text(RELOAD_PY)
    done = subprocess.run([sys.executable, str(out / "reload.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["checked"] == len(jobs) and result["bad"] == []


def test_a_step_on_a_quantized_model_is_refused_by_the_verb(setting):
    root, data = setting
    from lighten.models import ModelSpec, build_model

    spec = ModelSpec(python=f"{root / 'models.py'}:cnn", input_shape=[1, 8, 8])
    model = build_model(spec, input_shape=(1, 8, 8), num_classes=10)
    quantized = _compress(model, "quant.dynamic", data, seed=0)
    with pytest.raises(LightenError, match="prune.magnitude cannot run on a quantized model"):
        _compress(quantized, "prune.magnitude", data, seed=0)
