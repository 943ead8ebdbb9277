"""Per-layer quantization table: bits, scale statistics and SQNR against the float model."""

import copy
import json
import math
import textwrap

import pytest
import torch
from torch import nn

from lighten.errors import DataError
from lighten.quant import (
    DynamicConfig,
    PTQConfig,
    WeightOnlyConfig,
    quantize_dynamic_,
    quantize_ptq_,
    quantize_weight_only_,
)
from lighten.quant.layer_report import QuantFacts, has_quantized_layers, layer_table


class Net(nn.Module):
    """conv -> BN -> ReLU, a residual add followed by a ReLU module, then a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.relu2(x + self.conv2(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():  # a BN that really rescales, so folding matters
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 2.0)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 1, 8, 8, generator=g) for _ in range(2)]


def sqnr(out, ref):
    return 10 * math.log10(float(ref.double().pow(2).sum())
                           / float((out.double() - ref.double()).pow(2).sum()))


def ptq(net, batches, bits):
    return quantize_ptq_(copy.deepcopy(net), batches, PTQConfig(bits=bits))


def test_ptq_8bit_rows_above_25db_and_4bit_lower(net, batches):
    t8 = layer_table(net, ptq(net, batches, 8), batches)
    t4 = layer_table(net, ptq(net, batches, 4), batches)
    assert {r.name for r in t8.rows} == {"conv", "conv2", "fc", "relu2"}
    assert {r.kind for r in t8.rows} == {"QuantConv2d", "QuantLinear", "QuantAct"}
    for r in t8.rows:
        assert r.sqnr_db > 25 and r.sqnr_in_model_db > 25, r
        assert r.activation_bits == 8
    assert t8.logits_sqnr_db > 25 and t8.samples == 64
    by8 = {r.name: r for r in t8.rows}
    for r in t4.rows:
        assert r.weight_bits == (None if r.kind == "QuantAct" else 4) and r.activation_bits == 4
        assert r.sqnr_db < by8[r.name].sqnr_db - 10, r.name  # ~6 dB per bit, 4 bits fewer
    assert t4.logits_sqnr_db < t8.logits_sqnr_db - 10
    sqnrs = [r.sqnr_db for r in t4.rows]
    assert sqnrs == sorted(sqnrs)  # worst first


def test_folded_conv_is_compared_with_bn_and_relu_output(net, batches):
    q = ptq(net, batches, 8)
    row = next(r for r in layer_table(net, q, batches).rows if r.name == "conv")
    assert row.compared_with == "conv + bn (folded) + relu"
    x = torch.cat(batches)  # the first layer's input is the model input in both models
    with torch.no_grad():
        expected = sqnr(q.conv(x), net.relu(net.bn(net.conv(x))))
        wrong = sqnr(q.conv(x), net.conv(x))  # the unfolded conv is a different signal
    assert row.sqnr_db == pytest.approx(expected, abs=1e-6)
    assert row.sqnr_in_model_db == pytest.approx(expected, abs=1e-6)
    assert wrong < 10 < row.sqnr_db
    scales = q.conv.weight_scale
    assert (row.scale_min, row.scale_max) == (float(scales.min()), float(scales.max()))
    assert row.scale_min <= row.scale_median <= row.scale_max
    assert row.granularity == "per-channel"


def test_weight_only_4bit_rows_show_bits_and_group_size(net, batches):
    q = quantize_weight_only_(copy.deepcopy(net), WeightOnlyConfig(bits=4, group_size=16,
                                                                   method="rtn"))
    table = layer_table(net, q, batches)
    rows = {r.name: r for r in table.rows}
    assert set(rows) == {"conv", "conv2", "fc"}
    for name in ("conv2", "fc"):  # 72 and 128 input columns: several groups of 16
        r = rows[name]
        assert (r.weight_bits, r.activation_bits, r.granularity, r.group_size) == (
            4, "float", "group", 16)
        assert r.scale_min == float(q.get_submodule(name).weight_scale.float().min())
    assert rows["conv"].granularity == "per-channel"  # 9 columns fit in one group
    assert rows["conv"].compared_with == "conv"  # BN still there: the raw conv output
    assert all(10 < r.sqnr_db < 40 for r in table.rows)
    x = torch.cat(batches)
    with torch.no_grad():
        assert rows["conv"].sqnr_db == pytest.approx(sqnr(q.conv(x), net.conv(x)), abs=1e-6)


def test_dynamic_rows_say_dynamic_activations(batches):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    q = quantize_dynamic_(copy.deepcopy(mlp), DynamicConfig(bits=8))
    table = layer_table(mlp, q, batches)
    assert [r.kind for r in table.rows] == ["DynamicQuantLinear"] * 2
    assert all(r.activation_bits == "dynamic" and r.sqnr_db > 30 for r in table.rows)


class HalfLinear(nn.Linear):
    """A module type lighten does not know, stating its own facts (float16 weights)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.half().float(), self.bias)

    def quant_facts(self):
        return QuantFacts(weight_bits=16, activation_bits="float", granularity="per-tensor")


def test_new_module_types_describe_themselves(batches):
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8)).eval()
    half = nn.Sequential(nn.Flatten(), HalfLinear(64, 8)).eval()
    half.load_state_dict(float_model.state_dict())
    (row,) = layer_table(float_model, half, batches).rows
    assert (row.name, row.kind, row.weight_bits) == ("1", "HalfLinear", 16)
    assert 60 < row.sqnr_db < 90  # float16 rounding, ~11 bits of mantissa
    assert not has_quantized_layers(float_model) and has_quantized_layers(half)


class HalfInputLSTM(nn.LSTM):
    """A recurrent module (tuple output) that rounds its input to float16."""

    def forward(self, x, hx=None):
        return super().forward(x.half().float(), hx)

    def quant_facts(self):
        return QuantFacts(weight_bits=None, activation_bits=16, granularity="-")


class Seq(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm, self.head = lstm, nn.Linear(6, 3)

    def forward(self, x):  # (B, 1, 8, 8) -> 8 steps of 8 features
        out, _ = self.lstm(x.flatten(1, 2))
        return self.head(out[:, -1])


def test_tuple_outputs_compare_their_first_tensor(batches):
    torch.manual_seed(0)
    float_model = Seq(nn.LSTM(8, 6, batch_first=True)).eval()
    half = Seq(HalfInputLSTM(8, 6, batch_first=True)).eval()
    half.load_state_dict(float_model.state_dict())
    table = layer_table(float_model, half, batches)
    (row,) = table.rows
    assert row.name == "lstm" and 50 < row.sqnr_db < 90 and 50 < table.logits_sqnr_db


def test_no_batches_is_a_clear_error(net, batches):
    with pytest.raises(DataError, match="no input batches"):
        layer_table(net, ptq(net, batches, 8), [])


MODEL_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))

def build():
    return Net()
"""


def test_run_recipe_writes_layer_table_and_report_shows_it(tmp_path, monkeypatch):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(MODEL_FILE)
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""
        name: layers
        model: {{python: {tmp_path / 'net.py'}:build, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 256, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 2, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / 'out'}
        steps:
          - prune.magnitude: {{sparsity: 0.5}}
          - quant.ptq: {{bits: 8, calib_samples: 64}}
    """))
    result = run_recipe(load_recipe(tmp_path / "recipe.yaml"), progress=False)
    stages = result.output_dir / "stages"
    assert not (stages / "01-prune.magnitude.layers.json").exists()  # nothing quantized there
    table = json.loads((stages / "02-quant.ptq.layers.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert set(rows) == {"conv", "fc"}
    assert rows["conv"]["compared_with"] == "conv + bn (folded) + relu"
    assert all(r["sqnr_db"] > 25 for r in rows.values()) and table["logits_sqnr_db"] > 25
    md = (result.output_dir / "report.md").read_text()
    assert "## Quantized layers: quant.ptq (logits SQNR" in md
    assert "Quantized layers: prune.magnitude" not in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| conv | QuantConv2d |"))
    assert f"{rows['conv']['sqnr_db']:.1f}" in line
    assert "QuantLinear" in (result.output_dir / "report.html").read_text()
