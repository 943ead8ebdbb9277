"""arch.fold: every reorganization keeps the outputs (<= 1e-4), saves, reloads and exports."""

import copy
import textwrap

import pytest
import torch
from torch import nn

from lighten import compress
from lighten.arch.reorganize import FoldConfig, reorganize_
from lighten.arch.reparam import Zero
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.export import export_onnx
from lighten.models import ZOO, load_weights, shipped_checkpoint

MODELS = '''
import torch
from torch import nn


class RepBlock(nn.Module):
    """RepVGG training block: 3x3 conv+BN + 1x1 conv+BN + identity BN, summed, ReLU."""

    def __init__(self, c, stride=1):
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.bn_id = nn.BatchNorm2d(c) if stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.bn_id is not None:
            y = y + self.bn_id(x)
        return self.act(y)


class RepNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = RepBlock(8)
        self.block2 = RepBlock(8, stride=2)
        # an inline multi-branch sum in this forward (no block module to replace)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c1 = nn.Conv2d(8, 8, 1, groups=2)
        self.bn_id = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.unused = nn.Linear(8, 8)
        self.bn_fc = nn.BatchNorm1d(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        x = torch.relu(self.c3(x) + self.c1(x) + self.bn_id(x))
        x = self.drop(x).mean((2, 3))
        self.unused(x)  # dead branch: its output is never read
        return self.fc2(self.fc1(self.bn_fc(x)))


def repnet(num_classes=4):
    torch.manual_seed(0)
    model = RepNet(num_classes)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # trained-looking BN statistics, so folding has work to do
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model
'''


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_fold")
    path = root / "models.py"
    path.write_text(MODELS)
    return path


def _repnet(models_file):
    namespace: dict = {}
    exec(compile(MODELS, str(models_file), "exec"), namespace)
    return namespace["repnet"]().eval()


def _x(n=16, shape=(1, 8, 8), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_every_reorganization_is_exact_on_a_repvgg_model(models_file):
    model = _repnet(models_file)
    reference = copy.deepcopy(model)
    result = reorganize_(model, (_x(),))
    actions = {(c.module, c.action) for c in result.changes}
    assert ("block1", "reparam") in actions  # a whole block -> Sequential(conv, ReLU)
    assert ("block2", "reparam") in actions  # stride 2: 3x3 + 1x1 only
    assert ("c3", "reparam") in actions  # inline sum, grouped: the others become Zero
    assert ("drop", "drop") in actions and ("unused", "drop") in actions
    assert ("stem.1", "fold") in actions and ("bn_fc", "fold") in actions  # after / before
    assert ("fc1", "merge") in actions
    assert isinstance(model.block1, nn.Sequential) and isinstance(model.block1[0], nn.Conv2d)
    assert isinstance(model.c1, Zero) and isinstance(model.bn_id, Zero)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout))
                   for m in model.modules())
    for seed in (1, 2):  # inputs never seen by the passes' own check
        x = _x(seed=seed)
        with torch.no_grad():
            assert (model(x) - reference(x)).abs().max() <= 1e-4
    assert result.max_abs_diff <= 1e-4
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(model) < params(reference)


def test_reparam_fuses_kernels_exactly_at_float64():
    """The fused kernel is the exact sum: at float64 the difference is rounding only."""
    torch.manual_seed(0)
    conv3, conv1, bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv3, conv1, bn

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x) + x  # identity twice: BN and bare

    block = Sum().double().eval()
    reference = copy.deepcopy(block)
    x = _x(4, (4, 6, 6)).double()
    from lighten.arch.reparam import whole_block

    fused, parts = whole_block(block)
    assert sorted(parts) == ["a", "b", "c"]
    with torch.no_grad():
        assert (fused(x) - reference(x)).abs().max() < 1e-12


def test_untouched_when_nothing_is_exact():
    """A 1x1 bottleneck pair is not merged (more MACs); padded convs keep their BN before."""
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64), nn.BatchNorm1d(64)).eval()
    result = reorganize_(model, (torch.randn(8, 64),), FoldConfig(batchnorm=False))
    assert result.count("merge") == 0 and any("not merged" in n for n in result.notes)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)).eval()
    net[0].running_mean.fill_(1.0)
    result = reorganize_(net, (torch.randn(2, 3, 5, 5),))
    assert isinstance(net[0], nn.BatchNorm2d) and result.count("fold") == 0


@pytest.mark.parametrize("zoo", ["resnet20", "mobilenetv2"])
def test_zoo_models_fold_exactly_and_reload(zoo, tmp_path):
    model = ZOO[zoo](num_classes=10, input_shape=(1, 28, 28))
    weights = shipped_checkpoint(zoo, "fashion-mnist")
    if weights is not None:
        model = load_weights(model, weights)
    model.eval()
    reference = copy.deepcopy(model)
    x = _x(8, (1, 28, 28))
    result = reorganize_(model, (x,))
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    assert result.count("fold") == bns and result.count("fuse") > 0
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4
    spec = {"zoo": zoo}
    path = tmp_path / "folded.safetensors"
    save_artifact(model, path, model_spec=spec, input_shape=[1, 28, 28], num_classes=10)
    loaded, _ = load_artifact(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_python_model_reloads_and_exports_through_compress(models_file, tmp_path):
    """The library verb on a python: model; the artifact (Zero, Sequential, Identity) reloads
    from its recipe spec and the export runs on ONNX Runtime."""
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8],
                              num_classes=4))
    model = _repnet(models_file)
    folded, report = compress(model, {"arch.fold": {}}, data=data)
    assert report.summary["max_abs_diff"] <= 1e-4
    assert report.summary["reparam"] == 3 and report.summary["macs_after"] < \
        report.summary["macs_before"]
    assert {row["action"] for row in report.layers} >= {"fold", "drop", "reparam", "merge"}
    spec = {"python": f"{models_file}:repnet", "input_shape": [1, 8, 8]}
    path = tmp_path / "a.safetensors"
    save_artifact(folded, path, model_spec=spec, input_shape=[1, 8, 8], num_classes=4)
    loaded, _ = load_artifact(path)
    x = _x(5)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
    check = export_onnx(loaded, tmp_path / "m.onnx", input_shape=(1, 8, 8), sample_inputs=x)
    assert check.max_abs_diff < 1e-4


def test_later_steps_work_on_the_folded_model(models_file):
    """Zero branches and merged layers do not stop structured pruning or int8 quantization."""
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8],
                              num_classes=4))
    folded, _ = compress(_repnet(models_file), "arch.fold", data=data)
    pruned, report = compress(folded, {"prune.channels": {"ratio": 0.3}}, data=data)
    assert report.summary["params_after"] < report.summary["params_before"]
    quantized, report = compress(pruned, {"quant.ptq": {"calib_samples": 32}}, data=data)
    assert any(row["action"] == "quantize" for row in report.layers)


def test_recipe_runs_fold_then_separable(models_file, tmp_path, monkeypatch):
    """Both arch steps from one recipe: the runner reloads and exports every stage."""
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: arch
        model: {{python: {models_file}:repnet, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 128, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / 'out'}
        steps:
          - arch.fold: {{}}
          - arch.separable: {{measure_latency: false, finetune: {{epochs: 0.25}}}}
    """))
    result = run_recipe(load_recipe(recipe), progress=False)
    base, folded, separable = result.rows
    assert folded["agreement"] == pytest.approx(1.0)
    assert folded["params"] < base["params"] and separable["params"] < folded["params"]
    loaded, _ = load_artifact(tmp_path / "out" / "stages" / "02-arch.separable.safetensors")
    assert isinstance(loaded.block1[0], nn.Sequential)  # the fused conv, now separable


def test_ignore_and_bad_names():
    from lighten.errors import UnsupportedError

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout()).eval()
    result = reorganize_(model, (torch.randn(2, 1, 6, 6),), FoldConfig(ignore=["1"]))
    assert isinstance(model[1], nn.BatchNorm2d) and result.count("drop") == 1
    with pytest.raises(UnsupportedError, match="no module named 'nope'"):
        reorganize_(model, (torch.randn(2, 1, 6, 6),), FoldConfig(ignore=["nope"]))
