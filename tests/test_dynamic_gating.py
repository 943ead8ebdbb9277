"""dynamic.gating: a closed gate skips its block's nodes in the deployed graph, the gate
threshold meets target_macs on the held-out split, artifacts reload, recipes run."""

import copy
import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lighten
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.dynamic.early_exit import holdout_split
from lighten.dynamic.gating import GatedModel, GatingConfig
from lighten.measure.macs import count_macs
from lighten.models import ModelSpec, build_model
from lighten.training import TrainConfig, train

TRAIN = TrainConfig(epochs=1, lr=0.01, batch_size=64)

RES_NET = '''
import torch
from torch import nn


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def build():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         Res(16), Res(16), Res(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
'''


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gating") / "resnet.py"
    path.write_text(RES_NET)
    return path


@pytest.fixture(scope="module")
def gated(net_file, digits):
    torch.manual_seed(0)
    spec = {"python": f"{net_file}:build", "input_shape": [1, 8, 8]}
    model = build_model(ModelSpec(**spec), input_shape=(1, 8, 8), num_classes=10)
    train(model, digits.train, TrainConfig(epochs=3, lr=0.01, batch_size=64), progress=False)
    cfg = GatingConfig(target_macs=0.7, max_drop=None, gate_epochs=0.5,
                       finetune={"epochs": 0.5})
    gm, report = lighten.compress(model, cfg, data=digits, train=TRAIN)
    gm.backbone_spec = spec  # compress has no recipe to read it from
    return model.eval(), gm.eval(), report


def test_target_macs_is_met_on_the_held_out_split(gated, digits):
    base, gm, report = gated
    assert gm.chain[3:6] == ["3", "4", "5"] and gm.gated == [3, 4, 5]
    _, held = holdout_split(len(digits.train), 0.1, 0)
    x = torch.stack([digits.train[i][0] for i in held])
    executed = gm.executed_macs(gm.decisions(x))
    assert executed.mean() <= 0.7 * count_macs(base, digits.task) + 1e-6
    assert report.summary["dynamic"]["target_met"]


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


def test_max_drop_threshold_is_the_cheapest_within_the_drop_on_held_out_data(gated, digits):
    """The default calibration: on the held-out split, the chosen threshold loses at most
    max_drop points (plus its margin) against the model before gating, and a higher threshold
    (fewer blocks run) that was tried breaks that bound or costs no less."""
    from lighten.dynamic.gating import calibrate_threshold

    base, gm, _ = gated
    gm = copy.deepcopy(gm)
    _, held = holdout_split(len(digits.train), 0.1, 0)
    x = torch.stack([digits.train[i][0] for i in held])
    y = torch.tensor([int(digits.train[i][1]) for i in held])
    with torch.no_grad():
        reference = (base(x).argmax(-1) == y).numpy()
    macs = count_macs(base, digits.task)
    cal = calibrate_threshold(gm, x, y, base_macs=macs, reference=reference, max_drop=2.0,
                              margin=1.0)
    assert cal["met"] and gm.threshold.unique().tolist() == [pytest.approx(cal["threshold"])]
    with torch.no_grad():  # recomputed here, from the gated model's own batch forward
        right = (gm(x).argmax(-1) == y).numpy().astype(float)
    diff = reference - right
    bound = 100 * (diff.mean() + diff.std() / np.sqrt(len(diff)))
    assert bound == pytest.approx(cal["drop_bound"]) and bound <= 2.0
    assert gm.executed_macs(gm.decisions(x)).mean() / macs == pytest.approx(cal["macs_ratio"])
    for point in cal["curve"]:
        if point["threshold"] > cal["threshold"]:
            assert point["drop_bound"] > 2.0 or point["macs_ratio"] >= cal["macs_ratio"]
    # a drop no threshold meets (wrong labels, a reference right everywhere): every gate opens
    strict = calibrate_threshold(gm, x, (y + 1) % 10, base_macs=macs,
                                 reference=np.ones(len(y), bool), max_drop=0.5)
    assert not strict["met"] and gm.decisions(x).all()


def test_a_closed_gate_skips_its_nodes_in_the_deployed_graph(gated, digits, tmp_path):
    _, gm, _ = gated
    x = torch.stack([digits.test[i][0] for i in range(64)])
    with torch.no_grad():
        gm.threshold.fill_(float(gm.gate_logits(x)[:, 0].median()))  # block 3 runs for half
    opened = gm.decisions(x).sum(1)
    few, many = int(opened.argmin()), int(opened.argmax())
    assert opened[few] < opened[many]
    path = tmp_path / "model.onnx"
    onnx.save(gm.onnx_graph(digits.task.inputs), str(path))
    out_few, nodes_few = _profiled_nodes(path, x[few:few + 1].numpy(), tmp_path, "few")
    out_many, nodes_many = _profiled_nodes(path, x[many:many + 1].numpy(), tmp_path, "many")
    assert nodes_few < nodes_many
    with torch.no_grad():
        assert np.abs(out_few - gm(x[few:few + 1]).numpy()).max() < 1e-4
        assert gm._executed.count(True) == int(opened[few])  # batch 1 skipped the same blocks
        assert np.abs(out_many - gm(x[many:many + 1]).numpy()).max() < 1e-4
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert np.abs(session.run(None, {"input": x.numpy()})[0] - gm(x).numpy()).max() < 1e-4


def test_artifact_reloads_with_identical_outputs(gated, digits, tmp_path):
    _, gm, _ = gated
    path = tmp_path / "gated.safetensors"
    save_artifact(gm, path, model_spec=gm.backbone_spec, input_shape=[1, 8, 8], num_classes=10,
                  task=digits.task)
    loaded, _ = load_artifact(path, trust=True)  # the model file is the test's own
    assert isinstance(loaded, GatedModel) and loaded.gated == gm.gated
    x = torch.stack([digits.test[i][0] for i in range(32)])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm(x))
        assert torch.equal(loaded(x[:1]), gm(x[:1]))


def test_recipe_on_a_python_model(net_file, tmp_path):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    (tmp_path / "resnet.py").write_text(net_file.read_text())
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: gating
        model: {{python: resnet.py:build, input_shape: [1, 8, 8]}}
        data: {{name: digits, limit_test: 120}}
        train: {{epochs: 2, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - dynamic.gating: {{target_macs: 0.75, max_drop: null, gate_epochs: 0.5,
                              finetune: {{epochs: 0.3}}}}
    """))
    base, row = run_recipe(load_recipe(recipe), progress=False).rows
    assert row["dynamic"]["kind"] == "gating" and row["macs"] < base["macs"]
    assert [b["name"] for b in row["dynamic"]["blocks"]] == ["3", "4", "5"]
    deployed = out / "deploy" / "dynamic.gating" / "model.onnx"
    assert sum(n.op_type == "If" for n in onnx.load(str(deployed)).graph.node) == 3
    assert "Gated blocks: dynamic.gating" in (out / "report.md").read_text()


def test_unreachable_target_is_one_clear_error(net_file, digits):
    from lighten.errors import UnsupportedError

    model = build_model(ModelSpec(python=f"{net_file}:build", input_shape=[1, 8, 8]),
                        input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(UnsupportedError, match="target_macs 0.01 is below"):
        lighten.compress(model, GatingConfig(target_macs=0.01), data=digits, train=TRAIN)


def test_per_gate_budget_pushes_every_gate_to_the_shared_rate(net_file):
    from lighten.dynamic.gating import _gate, budget_term, open_rate

    backbone = build_model(ModelSpec(python=f"{net_file}:build", input_shape=[1, 8, 8]),
                           input_shape=(1, 8, 8), num_classes=10)
    gm = GatedModel(backbone, [str(i) for i in range(9)], [3, 4, 5],
                    [_gate((16, 8, 8)) for _ in range(3)], block_macs=[30, 30, 40],
                    total_macs=120)
    rate = open_rate(gm.block_macs, gm.total_macs, 0.7)
    assert rate * 100 + 20 == pytest.approx(0.7 * 120)  # all gates at that rate meet the target
    out = gm.train()(torch.randn(4, 1, 8, 8))
    assert len(gm.gate_open) == 3
    gm.gate_open = [torch.full((4,), rate)] * 3
    assert budget_term(1.0, 0.7)(gm, None, out, None).item() == pytest.approx(0, abs=1e-9)
    gm.gate_open = [torch.ones(4), torch.zeros(4), torch.full((4,), rate)]
    assert budget_term(1.0, 0.7)(gm, None, out, None).item() > 0.1  # per gate, not in total


def test_zoo_resnet20_gates_its_identity_blocks(digits):
    """On a zoo model: the blocks whose shortcut is the identity get gates (not the
    downsampling ones), the zoo name is recorded for reloading, one If per gate is deployed."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(zoo="resnet20"), input_shape=(1, 8, 8), num_classes=10)
    cfg = GatingConfig(target_macs=0.8, gate_epochs=0.1, distill=0.0, finetune={"epochs": 0.1})
    gm, _ = lighten.compress(model, cfg, data=digits, train=TRAIN)
    assert [gm.chain[i] for i in gm.gated] == [f"layers.{i}" for i in (0, 1, 2, 4, 5, 7, 8)]
    assert gm.backbone_spec == {"zoo": "resnet20"}
    graph = gm.onnx_graph(digits.task.inputs)
    assert sum(n.op_type == "If" for n in graph.graph.node) == 7


def test_threshold_target_follows_what_the_recipe_names():
    """``{target_macs: 0.7}`` asks for that cost: the threshold meets it; with nothing named the
    threshold keeps the accuracy (max_drop 0.5); both: target_macs trains, max_drop calibrates."""
    assert GatingConfig.model_validate({"target_macs": 0.7}).max_drop is None
    assert GatingConfig().max_drop == 0.5 and GatingConfig().target_macs == 0.7
    both = GatingConfig.model_validate({"target_macs": 0.6, "max_drop": 1.0})
    assert (both.target_macs, both.max_drop) == (0.6, 1.0)
    assert GatingConfig.model_validate({"finetune": {"epochs": 5}}).finetune.lr_scale == 0.3


def test_a_quantized_gated_model_exports_and_runs_in_onnx_runtime(gated, digits, tmp_path):
    """quant.ptq after dynamic.gating: the int8 gates' logits are reshaped inside the If
    branches (ORT's QDQ propagation aborted the process on the outer-graph reshape)."""
    from lighten.export import export_onnx

    _, gm, _ = gated
    quantized, _ = lighten.compress(gm, {"quant.ptq": {"calib_samples": 128}}, data=digits)
    x = torch.stack([digits.test[i][0] for i in range(32)])
    check = export_onnx(quantized, tmp_path / "q.onnx", input_shape=(1, 8, 8), sample_inputs=x)
    assert check.quantized and check.agreement >= 0.95
