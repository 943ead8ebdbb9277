"""arch.nas: the space derived from a model, the budget, resume, reload + export, errors."""

from __future__ import annotations

import csv
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from _models import CNN, RESIDUAL_BLOCK, model_source

import lighten
from lighten.arch.nas import NASConfig
from lighten.arch.nas_build import build_candidate
from lighten.arch.nas_space import derive_space
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.measure import count_macs, count_params
from lighten.models import ZOO, ModelSpec, build_model

pytest.importorskip("optuna")

MODELS = model_source(RESIDUAL_BLOCK, CNN, textwrap.dedent('''
    class Flat(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.fc = nn.Linear(64, classes)

        def forward(self, x):
            return self.fc(x.flatten(1))


    def flat():
        return Flat()


    def sized(width=8, hidden=16):
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, hidden),
                             nn.ReLU(), nn.Linear(hidden, 10))
'''))

SPACE = SimpleNamespace(widths=[0.5, 1.0, 1.5], expansions=[0.5, 1.0], depths="auto",
                        kernels=None, blocks=["conv"], round_to=4, ignore=[])
TINY = {"trials": 2, "proxy": {"epochs": 0.25, "train": 64, "holdout": 32},
        "rerank": {"top": 1, "epochs": 0.25, "train": 128, "holdout": 64},
        "finetune": {"epochs": 0.1}}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("nas")
    (root / "models.py").write_text(MODELS)
    data = load_data(DataSpec(name="digits"))  # 8x8 images, 10 classes
    return root, data


def _model(root, name="cnn"):
    spec = {"python": f"{root / 'models.py'}:{name}", "input_shape": [1, 8, 8]}
    torch.manual_seed(0)
    return build_model(ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10), spec


def test_space_of_resnet20_has_three_stages_of_blocks():
    model, example = ZOO["resnet20"](input_shape=(1, 8, 8)), (torch.zeros(1, 1, 8, 8),)
    space = derive_space(model, example, SPACE)
    assert [s.label for s in space.stages] == ["(8x8)", "(4x4)", "(2x2)"]
    assert [s.width for s in space.stages] == [16, 32, 64]
    # the first block of stages 2 and 3 has a projection shortcut: it stays
    assert [(s.fixed_blocks, len(s.blocks)) for s in space.stages] == [(0, 3), (1, 2), (1, 2)]
    assert all(set(space.choices(s)) == {"width", "expansion", "depth"} for s in space.stages)
    # the model's own shape rebuilds the model's own cost
    same = build_candidate(model, space, space.reference(), example)
    assert count_macs(same, (1, 8, 8)) == count_macs(model, (1, 8, 8))


def test_space_of_a_python_model_and_a_candidate_of_it(setting):
    root, _ = setting
    model, _ = _model(root)
    example = (torch.zeros(1, 1, 8, 8),)
    space = derive_space(model, example, SPACE)
    assert [s.label for s in space.stages] == ["(8x8)", "(linear)"]
    conv, head = space.stages
    assert conv.blocks == ["blocks.0", "blocks.1"] and conv.inner == 2
    assert set(space.choices(head)) == {"width"}  # the hidden Linear: no blocks, no convs
    arch = {"s1.width": 1.5, "s1.expansion": 0.5, "s1.depth": 1, "s2.width": 0.5}
    cand = build_candidate(model, space, arch, example)
    assert cand.stem[0].out_channels == 24 and cand.blocks[0].conv1.out_channels == 12
    assert type(cand.blocks[1]).__name__ == "SkippedBlock"
    assert cand.head[2].out_features == 16 and cand(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_inherited_candidates_are_sub_networks_of_the_trained_model(setting):
    """init: inherit: the model's own shape is the model itself; a narrower one keeps each
    group's most important channels (group L2) with their trained weights, a dropped block
    leaves the kept ones as they were, no width grows past the model's, and only a conv
    whose kernel changed starts fresh."""
    from lighten.graph import channel_groups
    from lighten.prune.importance import group_l2

    root, _ = setting
    model, _ = _model(root)
    model.eval()
    example = (torch.zeros(1, 1, 8, 8),)
    space = derive_space(model, example, SPACE)
    x = torch.randn(4, 1, 8, 8)
    same = build_candidate(model, space, space.reference(), example, inherit=True).eval()
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    wide = {"s1.width": 1.5, "s1.expansion": 1.0, "s1.depth": 2, "s2.width": 1.0}
    grown = build_candidate(model, space, wide, example, inherit=True)
    assert grown.stem[0].out_channels == model.stem[0].out_channels  # capped at 1x
    arch = {"s1.width": 0.5, "s1.expansion": 0.5, "s1.depth": 1, "s2.width": 1.0}
    cand = build_candidate(model, space, arch, example, inherit=True)
    assert type(cand.blocks[1]).__name__ == "SkippedBlock"
    stem = model.stem[0]
    (group,) = [g for g in channel_groups(model, example[0])
                if any(m.module == "stem.0" and m.kind == "out" for m in g.members)]
    n = cand.stem[0].out_channels
    assert n == stem.out_channels // 2
    kept = group_l2(model, group).argsort(descending=True)[:n].sort().values
    assert torch.equal(cand.stem[0].weight, stem.weight[kept])
    inner = cand.blocks[0].conv1
    assert inner.out_channels == model.blocks[0].conv1.out_channels // 4  # width x expansion
    assert torch.equal(cand.head[4].weight, model.head[4].weight)  # its input group kept whole
    scratch = build_candidate(model, space, arch, example)
    assert not torch.equal(scratch.head[4].weight, model.head[4].weight)
    space5 = derive_space(model, example, SimpleNamespace(**{**vars(SPACE), "kernels": [5]}))
    k5 = build_candidate(model, space5, {**arch, "s1.kernel": 5}, example, inherit=True)
    assert k5.blocks[0].conv1.kernel_size == (5, 5)
    assert torch.equal(k5.head[4].weight, model.head[4].weight)


def test_budget_is_respected_and_the_result_reloads_and_exports(setting, tmp_path):
    root, data = setting
    model, spec = _model(root)
    budget = 0.4 * count_macs(model, (1, 8, 8))
    out, report = lighten.compress(model, NASConfig(target_macs=0.4, **TINY), data=data,
                                   workdir=tmp_path)
    assert count_macs(out, (1, 8, 8)) <= budget
    assert report.summary["macs_after"] <= budget and report.summary["budget_met"]
    assert report.summary["trials"] == 2
    front = report.summary["pareto_front"]
    assert sum(r["chosen"] for r in front) == 1
    # the per-layer rows are the chosen architecture's changes to the input model's layers
    modules = dict(out.named_modules())
    assert report.layers and all(row["action"] in ("resize", "remove") for row in report.layers)
    for row in report.layers:
        if row["action"] == "resize":
            assert list(modules[row["module"]].weight.shape) == row["shape_after"]
    folder = tmp_path / "stages"
    (search,) = folder.glob("nas-*")
    assert (search / "study.db").is_file()
    lines = (search / "candidates.csv").read_text().splitlines()
    assert len(lines) >= 3 and lines[0].startswith("trial,state")
    path = tmp_path / "nas.safetensors"
    save_artifact(out, path, model_spec=spec, input_shape=[1, 8, 8], num_classes=10)
    loaded, _ = load_artifact(path, trust=True)  # our own models.py
    x = torch.stack([data.test[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), out.eval()(x), atol=1e-6)
    check = export_onnx(loaded, tmp_path / "nas.onnx", input_shape=(1, 8, 8), sample_inputs=x)
    assert check.max_abs_diff < 1e-4


def test_resume_skips_finished_trials(setting, tmp_path):
    root, data = setting
    model, _ = _model(root)
    config = {**TINY, "target_params": 0.5, "finetune": {"epochs": 0}}
    first = lighten.compress(model, NASConfig(**config), data=data, workdir=tmp_path)[1]
    (search,) = (tmp_path / "stages").glob("nas-*")
    before = (search / "candidates.csv").read_text().splitlines()
    # the same search interrupted after 2 trials and run again: they are loaded, not rerun
    out, second = lighten.compress(model, NASConfig(**{**config, "trials": 3}), data=data,
                                   workdir=tmp_path)
    # trials is part of the search's key: the resumed search is the same folder's study
    assert [p.name for p in (tmp_path / "stages").glob("nas-*")] == [search.name]
    after = (search / "candidates.csv").read_text().splitlines()
    assert first.summary["trials"] == 2 and second.summary["trials"] == 3
    assert any("resuming the search: 2 trial(s) already done" in n for n in second.notes)
    assert after[1:3] == before[1:3]  # same scores and timings: not trained again
    assert count_params(out)[0] <= 0.5 * count_params(model)[0]


def test_latency_budget_uses_the_calibrated_table_and_measures_the_result(setting, tmp_path):
    root, data = setting
    model, _ = _model(root)
    # a tiny model's time is mostly per-call overhead, which no narrower shape removes: a
    # budget under its own latency is at the mercy of timing noise on a shared machine, so the
    # machinery (table, prediction per candidate, whole-model check) is tested above it
    config = NASConfig(target_latency=1.5, latency_runs=3, check_models=1, **TINY)
    out, report = lighten.compress(model, config, data=data, workdir=tmp_path)
    s = report.summary
    assert s["budget_kind"] == "latency" and s["budget"] == pytest.approx(
        1.5 * s["input_latency_ms"])
    with open(next((tmp_path / "stages").glob("nas-*")) / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    complete = [r for r in rows if r["state"] == "complete"]
    assert complete
    for r in complete:  # every candidate within the prediction, unless a finalist was widened
        # after its whole-model timing showed the predictor pessimistic (it then fits measured)
        if float(r["predicted_ms"]) > s["budget"]:
            assert r.get("search_scale") and r.get("within_budget") == "True", r
    # the result was timed whole on ONNX Runtime and the predictor's error reported
    assert s["measured_ms"] > 0 and isinstance(s["budget_met"], bool)
    assert 0 <= s["predictor_median_error"] and s["predictor_checked"] >= 1
    # the load-independent error: predicted vs measured fraction of the input model's time
    assert 0 <= s["predictor_ratio_error"] < float("inf") and s["input_check_ms"] > 0
    assert any("as a fraction of the input model's time" in n for n in report.notes)
    assert any("latency predictor" in n for n in report.notes)


def test_factory_space_builds_from_the_recipe_and_reloads(setting, tmp_path):
    root, data = setting
    model, _ = _model(root, "sized")
    space = {"python": f"{root / 'models.py'}:sized", "params": {"width": [2, 4, 8],
                                                                "hidden": [4, 16]}}
    out, report = lighten.compress(model, NASConfig(target_params=0.6, space=space, **TINY),
                                   data=data, workdir=tmp_path)
    assert count_params(out)[0] <= 0.6 * count_params(model)[0]
    spec = report.summary["source_spec"]  # the artifact rebuilds from the chosen kwargs
    assert spec["python"] == space["python"] and set(spec["kwargs"]) == {"width", "hidden"}
    path = tmp_path / "f.safetensors"
    save_artifact(out, path, model_spec=spec, input_shape=[1, 8, 8], num_classes=10)
    loaded, manifest = load_artifact(path, trust=True)
    assert manifest["edits"] == []  # nothing to replay: the factory built it
    x = torch.stack([data.test[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), out.eval()(x), atol=1e-6)


def test_clear_errors(setting, tmp_path, monkeypatch):
    root, data = setting
    with pytest.raises(ValueError, match="exactly one budget"):
        NASConfig(trials=2)
    with pytest.raises(ValueError, match="exactly one budget"):
        NASConfig(target_macs=0.5, target_params=0.5)
    with pytest.raises(ValueError, match="time_budget"):
        NASConfig(target_macs=0.5, time_budget="soon")
    assert NASConfig(target_macs=0.5, time_budget="30m").time_budget == "30m"
    flat, _ = _model(root, "flat")
    with pytest.raises(UnsupportedError, match=r"cannot derive a search space.*space: "
                                               r"\{python:"):
        lighten.compress(flat, NASConfig(target_macs=0.5, **TINY), data=data,
                         workdir=tmp_path)
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the nas extra were missing
    model, _ = _model(root)
    with pytest.raises(UnsupportedError, match=r"pip install lighten\[nas\]"):
        lighten.compress(model, NASConfig(target_macs=0.5, **TINY), data=data,
                         workdir=tmp_path)


def test_the_widths_of_grouped_convs_shrink_like_any_other():
    """round_to counts a layer's channels: with 8 conv groups a channel group of 4 stands for
    8 layer channels each, so at width 0.5 it keeps 2 (16 layer channels), where rounding the
    group itself to round_to 4 kept such a model whole."""
    from torch import nn

    from lighten.arch.nas import NASSpaceConfig
    from lighten.arch.nas_build import COSTS, CandidateBuilder
    from lighten.arch.nas_space import derive_space

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=8),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    example = (torch.zeros(1, 1, 8, 8),)
    space = derive_space(model, example, NASSpaceConfig(widths=[0.5, 1.0]))
    builder = CandidateBuilder(model, space, example)
    arch = {f"{s.name}.width": 0.5 for s in space.stages}
    half = builder(arch, seed=0)
    assert COSTS["macs"](half, example) < 0.6 * COSTS["macs"](model, example)
    assert half(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert all(m.out_channels % m.groups == 0 for m in half.modules()
               if isinstance(m, nn.Conv2d))
