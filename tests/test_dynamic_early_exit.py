"""dynamic.early_exit: an exited sample really runs less on the deployed forms, thresholds meet
their target on the held-out data they were calibrated on, artifacts reload, recipes run."""

import copy
import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import lighten
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.dynamic import MultiExitModel, confidence
from lighten.dynamic.calibrate import calibrate, evaluate
from lighten.dynamic.early_exit import EarlyExitConfig, holdout_split
from lighten.dynamic.runtime import SegmentRuntime, export_segments
from lighten.errors import CheckpointError, RecipeError, UnsupportedError
from lighten.measure.macs import count_macs
from lighten.models import ZOO
from lighten.training import TrainConfig, train

TRAIN = TrainConfig(epochs=1, lr=0.01, batch_size=64)


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


@pytest.fixture(scope="module")
def lenet(digits):
    torch.manual_seed(0)
    model = ZOO["lenet5"](num_classes=10, input_shape=digits.input_shape)
    train(model, digits.train, TrainConfig(epochs=3, lr=0.01, batch_size=64), progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def exited(lenet, digits):
    # 3 points: this small LeNet-5's exits answer some samples (at 1 point none did, and a
    # step whose exits never answer returns the model without them); they save 2% of its MACs
    # (most sit in its first conv): min_saving 0 keeps them, for the mechanics tested here
    cfg = EarlyExitConfig(max_drop=3.0, head="pool", finetune={"epochs": 1}, min_saving=0.0)
    model, report = lighten.compress(lenet, cfg, data=digits, train=TRAIN)
    return model, report


def _held_out(digits, share=0.1, seed=0):
    _, held = holdout_split(len(digits.train), share, seed)
    return torch.stack([digits.train[i][0] for i in held]), \
        torch.tensor([int(digits.train[i][1]) for i in held])


def _exit_index(model, x):
    with torch.no_grad():
        outs = model.eval().all_exits(x)
    scores = torch.stack([confidence(o, model.criterion) for o in outs[:-1]], 1).numpy()
    chosen = np.full(len(x), len(outs) - 1)
    for k in reversed(range(len(outs) - 1)):
        chosen = np.where(scores[:, k] >= model.thresholds[k].item(), k, chosen)
    return chosen, outs


def _half_exiting(model, x):
    """A copy whose first exit answers the more confident half of ``x``."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        conf = confidence(model.all_exits(x)[0], model.criterion)
    model.thresholds.fill_(2.0)
    # halfway between the two middle confidences: torch's median is one sample's own value,
    # which ONNX Runtime's last-bit differences can put on either side of the threshold
    middle = conf.sort().values[len(conf) // 2 - 1: len(conf) // 2 + 1]
    model.thresholds[0] = middle.mean()
    return model, conf


def test_exited_sample_runs_fewer_segments_in_the_runtime(exited, digits, tmp_path):
    x = torch.stack([digits.test[i][0] for i in range(64)])
    model, conf = _half_exiting(exited[0], x)
    export_segments(model, tmp_path, x[:1])
    runtime = SegmentRuntime(tmp_path, threads=1)
    easy, hard = int(conf.argmax()), int(conf.argmin())
    logits, k = runtime.run_one(x[easy:easy + 1].numpy())
    assert k == 0 and runtime.calls == [1] + [0] * (len(runtime.calls) - 1)
    runtime.calls = [0] * len(runtime.calls)
    _, k = runtime.run_one(x[hard:hard + 1].numpy())
    assert k > 0 and runtime.calls[1] == 1
    # the runtime answers what the PyTorch model answers, at batch 1 and as a batch
    with torch.no_grad():
        ref = model(x).numpy()
    batch_logits, exits = runtime(x.numpy())
    assert np.abs(batch_logits - ref).max() < 1e-4
    assert 0 < (exits == 0).sum() < len(x)
    with torch.no_grad():
        assert np.abs(model(x[easy:easy + 1]).numpy() - logits).max() < 1e-4
    assert model._last_exit == 0


def _profiled_nodes(path, x, tmp_path, tag):
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / tag)
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x})[0]
    events = json.loads(open(session.end_profiling()).read())
    return out, sum(1 for e in events if e.get("cat") == "Node"
                    and e.get("name", "").endswith("_kernel_time"))


def test_exited_sample_runs_fewer_nodes_in_the_if_graph(exited, digits, tmp_path):
    """The deployed ONNX graph (what the runner exports): ORT's profiler counts the nodes it
    executed; a confident sample runs fewer than one that goes to the final exit."""
    x = torch.stack([digits.test[i][0] for i in range(64)])
    model, conf = _half_exiting(exited[0], x)
    proto = model.onnx_graph(digits.task.inputs)
    assert any(n.op_type == "If" for n in proto.graph.node)
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    easy, hard = int(conf.argmax()), int(conf.argmin())
    out_easy, nodes_easy = _profiled_nodes(path, x[easy:easy + 1].numpy(), tmp_path, "easy")
    out_hard, nodes_hard = _profiled_nodes(path, x[hard:hard + 1].numpy(), tmp_path, "hard")
    assert 0 < nodes_easy < nodes_hard
    with torch.no_grad():
        assert np.abs(out_easy - model(x[easy:easy + 1]).numpy()).max() < 1e-4
        assert np.abs(out_hard - model(x[hard:hard + 1]).numpy()).max() < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - model(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_if_graph_selects_per_row_like_the_model(exited, digits, criterion):
    """A batch whose rows answer at different exits: the If graph gives every row the logits
    of its own first confident exit, for both confidence criteria."""
    x = torch.stack([digits.test[i][0] for i in range(96)])
    model = copy.deepcopy(exited[0]).eval()
    model.criterion = criterion
    with torch.no_grad():
        outs = model.all_exits(x)
    left = torch.ones(len(x), dtype=torch.bool)
    for k in range(len(model.thresholds)):  # each exit answers a third of the rows reaching it
        conf = confidence(outs[k], criterion)
        model.thresholds[k] = conf[left].quantile(0.66)
        left &= conf < model.thresholds[k]
    session = ort.InferenceSession(model.onnx_graph(digits.task.inputs).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    chosen, _ = _exit_index(model, x)
    assert len(set(chosen.tolist())) == len(model.thresholds) + 1  # every exit answers some
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - ref).max() < 1e-4


def test_max_drop_is_met_on_the_held_out_split(exited, digits):
    model, report = exited
    x, y = _held_out(digits)
    chosen, outs = _exit_index(model, x)
    with torch.no_grad():
        selected = model.eval()(x)
    final_acc = (outs[-1].argmax(1) == y).float().mean().item()
    dynamic_acc = (selected.argmax(1) == y).float().mean().item()
    assert final_acc - dynamic_acc <= 3.0 / 100 + 1e-9
    summary = report.summary["dynamic"]
    assert summary["target_met"] and summary["held_out_samples"] == len(y)
    assert summary["held_out_accuracy"] == pytest.approx(dynamic_acc)
    # batch 1 really stops where the batch form selects, with the same logits
    for i in range(0, len(x), 17):
        with torch.no_grad():
            one = model(x[i:i + 1])
        assert model._last_exit == chosen[i]
        assert torch.allclose(one, selected[i:i + 1], atol=1e-5)


def test_target_macs_is_met_on_the_held_out_split(lenet, digits):
    cfg = EarlyExitConfig(target_macs=0.8, exits=["features.2"], head="pool",
                          criterion="entropy", head_epochs=2)
    model, _ = lighten.compress(lenet, cfg, data=digits, train=TRAIN)
    x, _ = _held_out(digits)
    chosen, _ = _exit_index(model, x)
    mean_macs = np.asarray(model.exit_macs, dtype=float)[chosen].mean()
    assert mean_macs <= 0.8 * count_macs(lenet, digits.task) + 1e-6
    assert (chosen == 0).any()


def test_calibrate_picks_the_cheapest_thresholds_within_the_drop():
    rng = np.random.default_rng(0)
    n = 2000
    scores = rng.uniform(size=(n, 2))
    correct = np.stack([rng.uniform(size=n) < 0.5 + 0.5 * scores[:, 0],
                        rng.uniform(size=n) < 0.5 + 0.5 * scores[:, 1],
                        rng.uniform(size=n) < 0.95], 1)
    cal = calibrate(scores, correct, [30, 60, 100], max_drop=2.0)
    acc, cost, _ = evaluate(scores, correct, [30, 60, 100], cal.thresholds)
    assert cal.met and acc >= correct[:, -1].mean() - 0.02 and cost < 100
    assert acc == pytest.approx(cal.accuracy) and sum(cal.shares) == pytest.approx(1.0)
    tight = calibrate(scores, correct, [30, 60, 100], target_macs=0.5)
    assert tight.met and tight.mean_cost <= 50


def test_calibrate_margin_keeps_standard_errors_of_the_drop_in_reserve():
    rng = np.random.default_rng(1)
    n = 3000
    scores = rng.uniform(size=(n, 1))
    correct = np.stack([rng.uniform(size=n) < 0.6 + 0.4 * scores[:, 0],
                        rng.uniform(size=n) < 0.95], 1)
    plain = calibrate(scores, correct, [40, 100], max_drop=2.0)
    safe = calibrate(scores, correct, [40, 100], max_drop=2.0, margin=2.0)
    assert plain.met and safe.met and safe.mean_cost > plain.mean_cost
    chosen = (scores[:, 0] < safe.thresholds[0]).astype(int)  # 0: exited, 1: final
    diff = correct[:, 1].astype(float) - correct[np.arange(n), chosen]
    assert diff.mean() + 2.0 * diff.std() / np.sqrt(n) <= 0.02 + 1e-12


def test_artifact_reloads_with_identical_outputs(exited, digits, tmp_path):
    model, _ = exited
    assert model.backbone_spec == {"zoo": "lenet5"}  # recognised from the zoo
    path = tmp_path / "ee.safetensors"
    save_artifact(model, path, model_spec={"zoo": "lenet5"}, input_shape=[1, 8, 8],
                  num_classes=10, task=digits.task)
    loaded, _ = load_artifact(path)
    assert isinstance(loaded, MultiExitModel) and loaded.exits == model.exits
    x = torch.stack([digits.test[i][0] for i in range(32)])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
        for i in range(4):
            assert torch.equal(loaded(x[i:i + 1]), model(x[i:i + 1]))
    assert torch.equal(loaded.thresholds, model.thresholds)


CHAIN_NET = '''
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
'''


def test_recipe_on_a_python_model(tmp_path):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    (tmp_path / "net.py").write_text(CHAIN_NET)
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: ee
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {{name: digits, limit_test: 120}}
        train: {{epochs: 2, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - dynamic.early_exit: {{target_macs: 0.8, head: pool, finetune: {{epochs: 0.5}}}}
    """))
    base, row = run_recipe(load_recipe(recipe), progress=False).rows
    dyn = row["dynamic"]
    assert sum(e["share"] for e in dyn["exits"]) == pytest.approx(1.0)
    assert row["macs"] == round(sum(e["share"] * e["macs"] for e in dyn["exits"]))
    assert row["latency_ms_b1"] == dyn["latency_ms_b1"] and "latency_ms_b1_ratio" not in row
    assert dyn["agreement_deployed_vs_loop"] == 1.0
    deployed = out / "deploy" / "dynamic.early_exit" / "model.onnx"
    assert any(n.op_type == "If" for n in onnx.load(str(deployed)).graph.node)
    model, manifest = load_artifact(out / "stages" / "01-dynamic.early_exit.safetensors",
                                    trust=True)
    assert isinstance(model, MultiExitModel) and manifest["model_spec"]["python"]
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(deployed), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - model(x).numpy()).max() < 1e-4


class _NotAChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_bad_input_is_one_clear_error(lenet, digits):
    with pytest.raises(UnsupportedError, match="not a chain of modules"):
        lighten.compress(_NotAChain(), EarlyExitConfig(head_epochs=0), data=digits)
    with pytest.raises(RecipeError, match="not both"):
        lighten.compress(lenet, {"dynamic.early_exit": {"max_drop": 1, "target_macs": 0.5}},
                         data=digits)
    with pytest.raises(UnsupportedError, match="classifier.5"):
        lighten.compress(lenet, EarlyExitConfig(exits=["classifier.5"]), data=digits)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model, _ = lighten.compress(seq, EarlyExitConfig(head_epochs=0.2, exits=["2"],
                                                     min_saving=0.0), data=_small(digits))
    assert isinstance(model, MultiExitModel)
    with pytest.raises(CheckpointError, match="backbone_spec"):
        save_artifact(model, "/tmp/never.safetensors", model_spec=None)


def _small(digits):
    small = copy.copy(digits)
    small.train = Subset(digits.train, range(300))
    return small


def test_exits_that_would_never_answer_are_not_kept(lenet, digits, monkeypatch):
    """Calibrated never to fire (threshold 2), an exit only adds its head: it is dropped, and
    with none left the step returns the model without exits."""
    from lighten.dynamic import early_exit as module
    from lighten.dynamic.calibrate import NEVER, Calibration

    def never(scores, correct, costs, **target):
        n = len(costs) - 1
        return Calibration([NEVER] * n, 1.0, 1.0, costs[-1], [0.0] * n + [1.0], [None] * n, True)

    monkeypatch.setattr(module, "calibrate", never)
    cfg = EarlyExitConfig(max_drop=1.0, head="pool")
    model, report = lighten.compress(lenet, cfg, data=digits, train=TRAIN)
    assert not isinstance(model, MultiExitModel)
    assert any("no exit answers any held-out sample" in n for n in report.notes)
    x = torch.stack([digits.test[i][0] for i in range(4)])
    assert model(x).shape == (4, 10)


def test_exits_that_save_too_little_are_not_kept(lenet, digits):
    cfg = EarlyExitConfig(max_drop=3.0, head="pool", finetune={"epochs": 1})
    model, report = lighten.compress(lenet, cfg, data=digits, train=TRAIN)
    assert not isinstance(model, MultiExitModel)
    assert any("less than min_saving 10%" in n for n in report.notes)
