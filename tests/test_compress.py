"""The one verb: every registered step through ``lighten.compress`` -> (model, Report); dispatch
on the config type; the recipe-dict form; missing data refused up front; ``skip:`` refused for
``ignore:``; the caller's model untouched; the runner's per-stage report files."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

import lighten
from lighten.data import DataSpec, load_data
from lighten.errors import DataError, RecipeError
from lighten.prune import ChannelPruneConfig, MagnitudePruneConfig
from lighten.prune.structured import NeuronPruneConfig
from lighten.quant import DynamicConfig, PTQConfig, WeightOnlyConfig
from lighten.quant.layer_report import quant_facts
from lighten.recipe import parse_recipe
from lighten.registry import STEPS, load_builtin_steps, register_step, step_for_config
from lighten.step import StepConfig
from lighten.verb import Report, compress


class Block(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))): a residual block prune.layers can remove."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyNet(nn.Module):
    """(B, 1, 8, 8) -> (B, 10): conv stem, two residual blocks, a hidden Linear layer."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block1, self.block2 = Block(width), Block(width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(4 * width, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(self.block2(self.block1(self.stem(x))))  # (B, C, 2, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TinyAttention(nn.Module):
    """(B, 1, 8, 8) read as 8 tokens of 8 features -> (B, 10), through nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.embed(x.flatten(1, 2))  # (B, 8, 16)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


class TinyChain(nn.Sequential):
    """A forward that is a chain of modules (stem, a residual block, pool, Linear): what the
    dynamic.* steps cut into segments."""

    def __init__(self):
        super().__init__(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _model(cls=TinyNet, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = cls(**kwargs)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# One small config per registered step; a new step must add its line here.
STEP_CASES = {
    "prune.magnitude": (TinyNet, {"sparsity": 0.5}),
    "prune.nm": (TinyNet, {"n": 2, "m": 4}),
    "prune.l1": (TinyNet, {"lam": 1e-4, "sparsity": 0.3, "finetune": {"epochs": 1}}),
    "prune.channels": (TinyNet, {"ratio": 0.5}),
    "prune.neurons": (TinyNet, {"ratio": 0.5}),
    "prune.layers": (TinyNet, {"count": 1}),
    "prune.heads": (TinyAttention, {"ratio": 0.5}),
    "quant.ptq": (TinyNet, {"calib_samples": 32}),
    "quant.dynamic": (TinyNet, {}),
    "quant.weight_only": (TinyNet, {"method": "gptq", "calib_samples": 32, "group_size": 8}),
    "quant.qat": (TinyNet, {"calib_samples": 32, "finetune": {"epochs": 1}}),
    "quant.mixed": (TinyNet, {"budget_bytes": 0.2, "calib_samples": 32}),
    "share.kmeans": (TinyNet, {"bits": "auto", "budget_bytes": 0.1, "calib_samples": 32}),
    "encode.entropy": (TinyNet, {}),
    "share.pq": (TinyNet, {"codebook_bits": 4, "linear_subvector": 2}),
    "share.channels": (TinyNet, {"count": 2}),
    "share.tie": (TinyNet, {"finetune": {"epochs": 1}}),
    "lowrank.svd": (TinyNet, {"rank": 4, "measure_latency": False}),
    "lowrank.tucker": (TinyNet, {"ranks": 4, "measure_latency": False}),
    "lowrank.cp": (TinyNet, {"rank": 4, "measure_latency": False}),
    "dynamic.early_exit": (TinyChain, {"target_macs": 0.6, "head": "pool", "head_epochs": 0.5}),
    "dynamic.gating": (TinyChain, {"target_macs": 0.7, "gate_epochs": 0.5,
                                   "finetune": {"epochs": 0.5}}),
    "arch.fold": (TinyNet, {}),
    "arch.separable": (TinyNet, {"measure_latency": False, "calibration_samples": 32}),
    "distill": (TinyNet, {"method": "dkd", "finetune": {"epochs": 0.5}}),
    "arch.nas": (TinyNet, {"target_macs": 0.6, "trials": 1, "finetune": {"epochs": 0.5},
                           "proxy": {"epochs": 0.25, "train": 32, "holdout": 16}}),
    "dynamic.slimmable": (TinyNet, {"widths": [1.0, 0.5], "finetune": {"epochs": 0.5}}),
    "dynamic.any_precision": (TinyNet, {"bits": [8, 4], "finetune": {"epochs": 0.5}}),
}
# steps without ``ignore:``, and why: they act on the whole model or the whole file, not per module
NO_IGNORE = {
    "distill": "trains a whole student",
    "encode.entropy": "codes every stream of the artifact file",
    "arch.nas": "searches and trains a whole new architecture",
    "llm.encoder_prune": "the same fractions in every encoder layer; keep_layers picks layers",
}


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8]))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# llm.* steps calibrate Hugging Face decoder/encoder blocks: tests/test_llm_quant.py and
# tests/test_llm_sparse.py call lighten.compress on tiny Llama and BERT models
OWN_TESTS = ("llm.",)


def test_every_registered_step_has_a_case():
    assert sorted(s for s in load_builtin_steps() if not s.startswith(OWN_TESTS)) == sorted(
        STEP_CASES)


@pytest.mark.parametrize("name", sorted(s for s in load_builtin_steps()
                                        if not s.startswith(OWN_TESTS)))
def test_every_step_through_compress(name, data):
    cls, options = STEP_CASES[name]
    model = _model(cls)
    before, types = _state(model), [type(m) for m in model.modules()]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    out, report = compress(model, step_config(name, options), data=data)

    assert isinstance(out, nn.Module) and isinstance(report, Report)
    assert out is not model and not out.training
    # the caller's model is untouched: same modules, same tensors
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        y = out(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()

    assert report.step == name and report.config == step_config(name, options).model_dump(
        mode="json")
    assert report.layers, f"{name} recorded no per-layer rows"
    modules = dict(out.named_modules())
    for row in report.layers:
        assert {"module", "action", "before", "after"} <= row.keys()
        _check_row_against_model(row, modules)
    s = report.summary
    # scales; exit heads and gates; a trained student's zero-initialised BN shifts move
    grows = name.startswith(("quant.", "dynamic.", "distill"))
    assert s["params_after"] <= s["params_before"] or grows
    assert s["nonzero_after"] <= s["nonzero_before"] or grows
    assert s["seconds"] >= 0
    # a program reads it back; a person reads the table
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    text = report.render()
    assert text.startswith(name) and report.layers[0]["module"] in text


def _check_row_against_model(row: dict, modules: dict[str, nn.Module]) -> None:
    """The typed facts of a row are what the returned model really holds."""
    module = modules.get(row["module"])
    if row["action"] == "remove":
        assert row["after"] in ("-", "removed")
        return
    assert module is not None, row
    if "sparsity" in row:
        zeros = float((module.weight == 0).float().mean())  # a BN row: its scale vector
        assert row["sparsity"] == pytest.approx(zeros, abs=1e-4)
    if "shape_after" in row:
        assert list(module.weight.shape) == row["shape_after"]
    if row["action"] == "quantize":
        facts = quant_facts(module)
        assert facts is not None and facts.weight_bits == row["weight_bits"]
    if row["action"] == "keep float":
        assert quant_facts(module) is None
    if "heads_after" in row:
        assert module.num_heads == row["heads_after"]


def step_config(name: str, options: dict) -> StepConfig:
    return STEPS[name].config_type.model_validate(options)


# ------------------------------------------------------------------------------ dispatch


def test_dispatch_on_config_type():
    load_builtin_steps()
    assert step_for_config(ChannelPruneConfig(ratio=0.5)).name == "prune.channels"
    assert step_for_config(NeuronPruneConfig(ratio=0.5)).name == "prune.neurons"

    class MyPTQ(PTQConfig):  # a user's subclass: the nearest registered base decides
        pass

    assert step_for_config(MyPTQ()).name == "quant.ptq"

    class Orphan(StepConfig):
        pass

    with pytest.raises(RecipeError, match="Orphan is not the config of any registered step"):
        compress(_model(), Orphan())


def test_two_steps_may_not_share_a_config_type():
    load_builtin_steps()
    with pytest.raises(RuntimeError, match="share the config type PTQConfig"):
        register_step("test.ptq_again", PTQConfig)(lambda model, config, ctx: model)
    assert "test.ptq_again" not in STEPS
    types = [spec.config_type for spec in STEPS.values()]
    assert len(types) == len(set(types))


def test_recipe_dict_and_name_forms_match_the_config_object(data):
    model = _model()
    a, _ = compress(model, MagnitudePruneConfig(sparsity=0.5))
    b, report = compress(model, {"prune.magnitude": {"sparsity": 0.5}})
    assert report.step == "prune.magnitude"
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                   b.state_dict().values(), strict=True))
    c, report = compress(model, "quant.dynamic")  # a name alone: the step's defaults
    assert report.config == DynamicConfig().model_dump(mode="json")
    assert type(c.fc1).__name__ == "DynamicQuantLinear"


def test_mapping_errors_read_like_recipe_errors(tmp_path):
    with pytest.raises(RecipeError) as err:
        compress(_model(), {"prune.magnitude": {"sparsity": 1.5}})
    with pytest.raises(RecipeError) as from_recipe:
        parse_recipe({"name": "x", "model": {"zoo": "lenet5"}, "data": {"name": "digits"},
                      "steps": [{"prune.magnitude": {"sparsity": 1.5}}]})
    assert str(err.value).startswith("compress prune.magnitude: sparsity")
    assert str(err.value).removeprefix("compress ") == str(from_recipe.value).split(
        "steps[0] ", 1)[1]
    with pytest.raises(RecipeError, match="unknown step 'prune.magnitud'.*did you mean "
                                          "'prune.magnitude'"):
        compress(_model(), {"prune.magnitud": {}})
    with pytest.raises(RecipeError, match="a mapping with one step"):
        compress(_model(), {"prune.magnitude": {}, "quant.ptq": {}})


# ---------------------------------------------------------------------------------- data


@pytest.mark.parametrize("config, need", [
    (PTQConfig(), "quant.ptq needs calibration inputs"),
    (WeightOnlyConfig(method="gptq"), "quant.weight_only needs calibration inputs"),
    (ChannelPruneConfig(ratio=0.5), "prune.channels needs example inputs to trace the model"),
    (ChannelPruneConfig(ratio=0.5, importance="taylor"),
     "prune.channels needs example inputs to trace the model and labelled training samples"),
    (MagnitudePruneConfig(sparsity=0.5, finetune={"epochs": 1}),
     "prune.magnitude needs labelled training data for finetune:"),
    ({"quant.qat": {"finetune": {"epochs": 1}}}, "quant.qat needs calibration inputs and "
                                                  "labelled training data for finetune:"),
])
def test_missing_data_is_one_clear_error(config, need):
    model = _model()
    before = _state(model)
    with pytest.raises(DataError) as err:
        compress(model, config)
    message = str(err.value)
    assert message.startswith(need) and "pass data=" in message and "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config", [MagnitudePruneConfig(sparsity=0.5), {"prune.nm": {}},
                                    DynamicConfig(), WeightOnlyConfig(method="rtn")])
def test_data_free_steps_run_without_data(config):
    out, report = compress(_model(), config)
    assert report.layers and out(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_a_step_that_reads_undeclared_data_gets_a_data_error():
    class PeekConfig(StepConfig):
        pass

    @register_step("test.peek", PeekConfig)
    def peek(model, config, ctx):
        next(ctx.calibration_batches(8))
        return model

    try:
        with pytest.raises(DataError, match="test.peek needs data with this config"):
            compress(_model(), PeekConfig())
    finally:
        del STEPS["test.peek"]


# ------------------------------------------------------------------------------- ignore


@pytest.mark.parametrize("name", ["quant.ptq", "quant.dynamic", "quant.weight_only"])
def test_skip_is_refused_with_did_you_mean_ignore(name):
    config_type = load_builtin_steps()[name].config_type
    with pytest.raises(ValidationError, match="did you mean 'ignore'"):
        config_type(skip=["fc1"])
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "x", "model": {"zoo": "lenet5"}, "data": {"name": "digits"},
                      "steps": [{name: {"skip": ["fc1"]}}]})
    assert str(err.value) == (f"<dict>: steps[0] {name}: unknown key 'skip'; did you mean "
                              "'ignore'? (every step names the modules it leaves alone 'ignore')")


def test_every_step_says_ignore():
    for name, spec in load_builtin_steps().items():
        assert ("ignore" in spec.config_type.model_fields) != (name in NO_IGNORE), name
        assert "skip" not in spec.config_type.model_fields, name


@pytest.mark.parametrize("name", ["quant.ptq", "quant.mixed"])
def test_ignored_layer_stays_float_with_its_reason(name, data):
    options = {"ignore": ["fc1"], "calib_samples": 32}
    if name == "quant.mixed":
        options["budget_bytes"] = 0.3
    out, report = compress(_model(), {name: options}, data=data)
    assert quant_facts(out.fc1) is None and quant_facts(out.fc2) is not None
    row = next(r for r in report.layers if r["module"] == "fc1")
    assert row["action"] == "keep float" and row["reason"] == "listed in ignore"


# ---------------------------------------------------------------------- model and target


def test_inplace_changes_and_returns_the_callers_model():
    model = _model()
    out, _ = compress(model, MagnitudePruneConfig(sparsity=0.5), inplace=True)
    assert out is model and float((model.fc1.weight == 0).float().mean()) > 0.2


def test_target_reaches_the_step(data):
    from lighten.target import Target

    widths = {}
    for cpu in ("avx2", "avx512"):
        out, report = compress(_model(width=48), ChannelPruneConfig(ratio=0.5, round_to="auto"),
                               data=data, target=Target(cpu=cpu))
        widths[cpu] = out.stem[0].out_channels
        assert any(f"target cpu {cpu}" in n for n in report.notes)
    assert widths == {"avx2": 24, "avx512": 32}


def test_exported_from_the_package():
    assert lighten.compress is compress and lighten.Report is Report


# ---------------------------------------------------------------------------------- runner

def test_runner_writes_each_steps_report_and_the_report_renders_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    """))
    recipe = parse_recipe({
        "name": "verb", "model": {"python": str(tmp_path / "net.py") + ":build",
                                  "input_shape": [1, 8, 8]},
        "data": {"name": "synthetic", "samples": 64, "input_shape": [1, 8, 8], "num_classes": 4},
        "train": {"epochs": 1, "batch_size": 32}, "measure": {"robustness": False,
                                                              "eval_limit": 32},
        "deploy": {"latency_runs": 3}, "output": str(tmp_path / "out"),
        "steps": [{"prune.magnitude": {"sparsity": 0.5}}, {"quant.dynamic": {}}]})
    result = lighten.run_recipe(recipe, progress=False)
    stages = tmp_path / "out" / "stages"
    saved = Report.from_dict(json.loads((stages / "01-prune.magnitude.report.json").read_text()))
    assert saved.step == "prune.magnitude"
    assert [r["module"] for r in saved.layers] == ["0", "3", "5"]
    assert sum(r["sparsity"] * r["params"] for r in saved.layers) == pytest.approx(
        0.5 * sum(r["params"] for r in saved.layers), abs=1)
    dynamic = json.loads((stages / "02-quant.dynamic.report.json").read_text())
    assert {r["module"]: r["action"] for r in dynamic["layers"]} == {
        "0": "keep float", "3": "quantize", "5": "quantize"}
    assert not (stages / "00-baseline.report.json").exists()
    assert any("prune.magnitude: 50.0% of prunable weights" in n for n in result.notes)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Layers: prune.magnitude" in markdown and "## Layers: quant.dynamic" in markdown
    assert "| 3 | quantize | Linear | w8, dynamic activations | - |" in markdown


def test_compress_takes_a_train_test_pair_and_names_a_shape_mismatch():
    from torch.utils.data import TensorDataset

    from lighten.errors import DataError, ModelError

    g = torch.Generator().manual_seed(0)
    pair = (TensorDataset(torch.randn(64, 6, generator=g), torch.arange(64) % 3),
            TensorDataset(torch.randn(16, 6, generator=g), torch.arange(16) % 3))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pruned, _ = compress(model, {"prune.magnitude": {"sparsity": 0.5}}, data=pair)
    assert float((pruned[0].weight == 0).float().mean()) >= 0.4
    with pytest.raises(ModelError, match=r"cannot run on inputs of shape \[6\]: RuntimeError: "
                                         r"mat1 and mat2.*; give data whose inputs the model"):
        compress(nn.Sequential(nn.Linear(5, 3)), "quant.ptq", data=pair)

    class Asserts(nn.Module):  # a bare `assert` outside pytest: an exception with no message
        def forward(self, x):
            if x.shape[-1] != 5:
                raise AssertionError
            return x

    with pytest.raises(ModelError, match=r"AssertionError: ; give data"):
        compress(nn.Sequential(Asserts(), nn.Linear(5, 3)), "quant.ptq", data=pair)
    with pytest.raises(ModelError, match="needs an nn.Module, got function"):
        compress(lambda x: x, "quant.dynamic", data=pair)
    with pytest.raises(DataError, match=r"a \(train, test\) pair of datasets, got dict"):
        compress(model, "quant.dynamic", data={"train": pair[0]})


def test_a_layer_type_the_step_cannot_quantize_says_so():
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    pair = (TensorDataset(torch.randn(64, 2, 16, generator=g), torch.arange(64) % 3),
            TensorDataset(torch.randn(16, 2, 16, generator=g), torch.arange(16) % 3))
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 3))
    _, report = compress(model, {"quant.weight_only": {"bits": 4, "method": "rtn"}}, data=pair)
    row = next(r for r in report.layers if r["module"] == "0")
    assert row["action"] == "keep float"
    assert row["reason"] == "this step has no quantized form of Conv1d"
    note = "1 Conv1d layer(s) stay float (0): this step has no quantized form of Conv1d"
    assert note in report.notes


def test_weight_normalized_layers_are_compressed_through_their_real_weight():
    """quant.mixed read a weight_norm layer's hidden parameters (it gave them 2 bits); the
    parametrizations are folded into plain weights first, outputs unchanged."""
    from torch.nn.utils.parametrizations import weight_norm
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    pair = (TensorDataset(torch.randn(96, 16, generator=g), torch.arange(96) % 3),
            TensorDataset(torch.randn(32, 16, generator=g), torch.arange(32) % 3))
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(16, 32)), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = model(x)
    mixed, report = compress(model, {"quant.mixed": {"budget_bytes": 0.5, "calib_samples": 32}},
                             data=pair)
    assert any("parametrized 0.weight folded into plain weights" in n for n in report.notes)
    chosen = next(n for n in report.notes if "budget weight bytes" in n)
    assert "0=8" in chosen  # every layer fits at 8 bits: not the 2 bits a hidden tensor drew
    with torch.no_grad():
        assert float((mixed(x) - before).abs().max()) < 0.1 * float(before.abs().max())
