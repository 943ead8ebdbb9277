"""Layers that share a weight keep sharing it when a step replaces them: quantization stores
the tied weight's int8 form once (also after a save and a load); where the tie cannot be kept
(GPTQ sees each layer's own inputs; an LM head tied to an embedding that is not quantized),
the step's notes say so."""

from __future__ import annotations

import textwrap

import pytest
import torch

from lighten import compress
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.measure import count_params
from lighten.ties import Tie, retie, tied_groups

NET_PY = textwrap.dedent("""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, tie=True):
            super().__init__()
            self.inp, self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64)
            self.out = nn.Linear(64, 4)
            if tie:
                self.b.weight, self.b.bias = self.a.weight, self.a.bias

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x)))))))


    def build(num_classes=4, input_shape=(16,)):
        return Net()
""")


@pytest.fixture
def net(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(NET_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import net as module

    importlib.reload(module)
    torch.manual_seed(0)
    return module.Net(), f"{tmp_path / 'net.py'}:build"


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec(name="synthetic", samples=256, input_shape=[16], num_classes=4))


def test_tied_groups_lists_each_shared_weight_once(net):
    model, _ = net
    assert tied_groups(model) == [Tie("weight", ("a", "b")), Tie("bias", ("a", "b"))]


@pytest.mark.parametrize("step", [{"quant.dynamic": {}}, {"quant.ptq": {"calib_samples": 64}}])
def test_quantized_tied_layers_store_one_int8_weight_and_reload_tied(net, data, step, tmp_path):
    model, source = net
    params = count_params(model)[0]
    x = torch.randn(5, 16)
    quantized, report = compress(model, step, data=data)
    assert quantized.b.weight_int is quantized.a.weight_int
    assert count_params(quantized)[0] == params  # the tied weight counted once, as before
    assert any("tied weights stay stored once (1 group): a, b" in n for n in report.notes)
    path = tmp_path / "q.safetensors"
    save_artifact(quantized, path, model_spec={"python": source, "input_shape": [16]},
                  input_shape=[16], num_classes=4)
    loaded, _ = load_artifact(path, trust=True)
    assert loaded.b.weight_int is loaded.a.weight_int
    torch.testing.assert_close(loaded(x), quantized(x))


def test_a_tie_the_step_cannot_keep_is_reported(net, data):
    model, _ = net
    quantized, report = compress(model, {"quant.weight_only": {"bits": 4, "method": "gptq"}},
                                 data=data)
    assert quantized.b.weight_int is not quantized.a.weight_int  # each saw its own inputs
    assert any("a, b shared one weight and now store it separately" in n for n in report.notes)
    assert not any("stay stored once" in n for n in report.notes)


def test_an_lm_head_tied_to_its_embedding_is_reported_when_only_the_head_is_quantized():
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(32, 16), nn.Linear(16, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = Tiny()
    groups = tied_groups(model)
    assert groups == [Tie("weight", ("emb", "head"))]
    model.head = nn.Linear(16, 32, bias=False)  # what a step replacing the head leaves
    assert retie(model, groups) == ([], ["emb, head"])


def test_only_what_the_tied_parameter_became_is_shared():
    """A block whose gate vector is tied, its own norm and layer not: a step that leaves the
    blocks as they are keeps everything else apart and reports nothing."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
            self.gate = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.fc(self.norm(x)) * self.gate

    model = nn.Sequential(Block(), Block())
    model[1].gate = model[0].gate
    ties = tied_groups(model)
    assert ties == [Tie("gate", ("0", "1"))]
    model[0].fc = nn.Linear(8, 8)  # a step replacing something else entirely
    assert retie(model, ties) == ([], [])
    assert model[0].norm.weight is not model[1].norm.weight  # equal values, never tied
