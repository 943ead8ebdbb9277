"""`lighten check` facts on tiny models with known problems."""

import pytest
import torch
from torch import nn

from lighten import check
from lighten.check import MODULE_FACTS, ModuleFact, check_model, format_check
from lighten.errors import ModelError


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the ONNX tracer freezes one branch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        if x.sum() > 0:
            return x * self.scale.view(1, -1, 1, 1)
        return x


class Net(nn.Module):
    def __init__(self, gate=True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gate = Gate() if gate else nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.bn(self.conv(x)))))


def by_name(rows):
    return {r.name: r for r in rows}


def test_untraceable_module_is_named_with_its_reason():
    rows = by_name(check_model(Net(), (1, 8, 8)))
    gate = rows["gate"]
    assert gate.cells["traceable"] == "no"
    assert any("traceable: TraceError" in w and "control flow" in w for w in gate.why_not)
    # every other module is blamed on the culprit, not given a vague failure
    assert rows["conv"].cells["traceable"] == "no"
    assert any("because of `gate`" in w for w in rows["conv"].why_not)
    # tracing for ONNX freezes the branch, but both branches compute the same (scale is ones):
    # the export matches PyTorch on other inputs, so no claim (tests/test_check_vit.py: one that
    # differs)
    assert gate.cells["exportable"] == "yes"
    assert rows["conv"].cells["exportable"] == "yes"


def test_per_module_facts_params_and_macs():
    model = Net(gate=False)
    rows = by_name(check_model(model, (1, 8, 8)))
    assert list(rows) == ["conv", "bn", "gate", "head.0", "head.1", "unused"]
    assert all(r.cells["traceable"] == "yes" for r in rows.values() if r.name != "unused")
    assert rows["conv"].params == 4 * 9 + 4 and rows["head.1"].params == 144 * 3 + 3
    assert rows["conv"].macs == 4 * 6 * 6 * 9  # out elements x kernel size
    assert rows["head.1"].macs == 144 * 3
    assert rows["conv"].cells["prunable"] == "yes" and rows["conv"].cells["quantizable"] == "yes"
    assert rows["bn"].cells["prunable"] == "no" and rows["bn"].cells["quantizable"] == "stays float"
    assert rows["head.0"].cells["prunable"] == "-"  # nothing stored, nothing to prune
    assert rows["unused"].cells["measurable"] == "no"
    assert rows["unused"].cells["traceable"] == "no"
    assert "never called in forward" in " ".join(rows["unused"].why_not)
    assert rows["conv"].why_not == []
    assert model.training  # the mode the caller left is restored


def test_module_facts_are_data_a_new_technique_is_one_entry(monkeypatch):
    monkeypatch.setitem(MODULE_FACTS, "fancy", ModuleFact(lambda m: isinstance(m, nn.Conv2d),
                                                          "only convolutions"))
    rows = by_name(check_model(Net(gate=False), (1, 8, 8)))
    assert rows["conv"].cells["fancy"] == "yes"
    assert rows["head.1"].cells["fancy"] == "no"
    assert "fancy: only convolutions" in rows["head.1"].why_not
    assert "fancy" in format_check(list(rows.values())).splitlines()[0]


def test_export_failure_is_attributed_to_the_module(monkeypatch):
    class Broken(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Flatten(), Broken(), nn.Linear(64, 2))
    real_export = check._export

    def export(module, example):  # the exporter refuses Broken (e.g. an unsupported op)
        if isinstance(module, Broken) or any(isinstance(m, Broken) for m in module.modules()):
            return "UnsupportedOperatorError: broken op", []
        return real_export(module, example)

    monkeypatch.setattr(check, "_export", export)
    rows = by_name(check_model(model, (1, 8, 8)))
    assert rows["1"].cells["exportable"] == "no"
    assert "ONNX export: UnsupportedOperatorError" in " ".join(rows["1"].why_not)
    assert "model export failed" in " ".join(rows["2"].why_not)


def test_custom_leaf_module_is_inlined_by_fx():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s

    rows = by_name(check_model(nn.Sequential(nn.Flatten(), Scale()), (1, 2, 2)))
    assert rows["0"].cells["traceable"] == "yes"
    assert rows["1"].cells["traceable"] == "inlined"
    assert rows["1"].cells["exportable"] == "yes"


def test_format_check_table_and_summary():
    text = format_check(check_model(Net(), (1, 8, 8)))
    header = text.splitlines()[0].split()
    assert header[:4] == ["module", "type", "params", "MACs"]
    assert "why" in header
    # prunable: conv, head.1 and unused, of the 5 modules that hold parameters
    assert "traceable 0/6" in text and "prunable 3/5" in text


@pytest.mark.parametrize("shape", [(), (1, 0, 8), ("a", 8)])
def test_bad_input_shape_is_a_model_error(shape):
    with pytest.raises(ModelError, match="input shape"):
        check_model(Net(), shape)


def test_model_that_does_not_run_on_the_shape():
    with pytest.raises(ModelError, match=r"does not run on input shape \(1, 5, 5\)"):
        check_model(Net(), (1, 5, 5))
