"""Layer specs: `lighten check` and the steps agree on every layer type with a spec.

For each layer type a tiny model holds it; check's per-module answers are compared with what
prune.magnitude, prune.channels / prune.neurons, prune.heads, quant.ptq, quant.dynamic and
quant.weight_only really do to a copy of that model ("yes" iff the step changed that layer).
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lighten.check import MODULE_FACTS, check_model, format_check
from lighten.errors import LightenError
from lighten.graph import MODULE_KINDS
from lighten.layers import (
    LAYER_SPECS,
    LayerSpec,
    build_layer,
    constructor_attrs,
    layer_config,
    layer_spec,
    register_layer_spec,
)
from lighten.prune.surgery import SURGERY
from lighten.quant.modules import QUANT_CLASSES

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- tiny models


class ConvNet(nn.Module):
    """conv -> BN -> PReLU -> [transposed conv] -> conv -> mean -> Linear, in 1/2/3-D."""

    def __init__(self, dims: int, transposed: bool = False):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        convt = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
        self.dims = dims
        self.c1 = conv(1, 8, 3, padding=1)
        self.bn = bn(8)
        self.act = nn.PReLU()
        self.up = convt(8, 8, 2, stride=2) if transposed else nn.Identity()
        self.c2 = conv(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.c2(self.up(self.act(self.bn(self.c1(x)))))
        return self.fc(x.mean(tuple(range(2, 2 + self.dims))))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.gn(self.c1(x)))).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.ln = nn.LayerNorm(32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.ln(self.fc1(x.flatten(1))))))


class Tokens(nn.Module):
    """Token ids (B, T) -> Embedding -> Linear -> mean."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids)).mean(1)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):  # (B, 1, 8, 8) -> 8 steps of 8 features
        out, _ = self.lstm(x.flatten(1, 2))
        return self.fc(out[:, -1])


class ViT(nn.Module):
    """8x8 image -> 8 tokens -> + positional embedding (held by the model) -> attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.pos = nn.Parameter(torch.randn(1, 8, 32) * 0.02)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2)) + self.pos  # (B, 8, 32)
        t = self.norm(t + self.attn(t, t, t, need_weights=False)[0])
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def _image(*shape):
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


# layer type -> (model factory, example input of batch 1)
CASES = {
    nn.Conv1d: (lambda: ConvNet(1), _image(1, 16)),
    nn.Conv2d: (lambda: ConvNet(2), _image(1, 8, 8)),
    nn.Conv3d: (lambda: ConvNet(3), _image(1, 4, 4, 4)),
    nn.ConvTranspose1d: (lambda: ConvNet(1, transposed=True), _image(1, 16)),
    nn.ConvTranspose2d: (lambda: ConvNet(2, transposed=True), _image(1, 8, 8)),
    nn.ConvTranspose3d: (lambda: ConvNet(3, transposed=True), _image(1, 4, 4, 4)),
    nn.BatchNorm1d: (lambda: ConvNet(1), _image(1, 16)),
    nn.BatchNorm2d: (lambda: ConvNet(2), _image(1, 8, 8)),
    nn.BatchNorm3d: (lambda: ConvNet(3), _image(1, 4, 4, 4)),
    nn.PReLU: (lambda: ConvNet(2), _image(1, 8, 8)),
    nn.GroupNorm: (GroupNormNet, _image(1, 8, 8)),
    nn.Linear: (MLP, _image(1, 8, 8)),
    nn.LayerNorm: (MLP, _image(1, 8, 8)),
    nn.Embedding: (Tokens, torch.arange(6).view(1, 6)),
    nn.LSTM: (Recurrent, _image(1, 8, 8)),
    nn.MultiheadAttention: (ViT, _image(1, 8, 8)),
}


# ----------------------------------------------------------------------------- the steps, for real


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    """Modules replaced, removed or resized by a step (compared by path)."""
    out = set()
    for name, module in before.named_modules():
        try:
            new = after.get_submodule(name)
        except AttributeError:
            out.add(name)
            continue
        old_shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
        new_shapes = [tuple(p.shape) for p in new.parameters(recurse=False)]
        if type(new) is not type(module) or old_shapes != new_shapes:
            out.add(name)
    return out


def _replaced_by(before: nn.Module, after: nn.Module, types) -> set[str]:
    out = set()
    for name, _ in before.named_modules():
        try:
            if isinstance(after.get_submodule(name), types):
                out.add(name)
        except AttributeError:
            pass
    return out


def _try(step, model: nn.Module) -> nn.Module:
    """Run ``step`` on a copy; a step that refuses the model changes nothing."""
    copied = copy.deepcopy(model).eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            step(copied)
    except LightenError:
        return copy.deepcopy(model)
    return copied


def what_steps_do(model: nn.Module, x: torch.Tensor) -> dict[str, set[str]]:
    from lighten.prune.heads import HeadPruneConfig, prune_heads_
    from lighten.prune.magnitude import MagnitudePruneConfig, prune_magnitude_
    from lighten.prune.structured import ChannelPruneConfig, NeuronPruneConfig, prune_channels_
    from lighten.quant.dynamic import DynamicQuantLinear, quantize_dynamic_
    from lighten.quant.dynamic_rnn import DynamicQuantLSTM
    from lighten.quant.embedding import Int8Embedding
    from lighten.quant.modules import _QuantLayer
    from lighten.quant.ptq import PTQConfig, quantize_ptq_
    from lighten.quant.weight_only import WeightOnlyConfig, _WeightOnlyLayer, quantize_weight_only_

    def sparsified(m: nn.Module) -> set[str]:
        pruned = _try(lambda c: prune_magnitude_(c, MagnitudePruneConfig(sparsity=0.5)), m)
        return {n for n, mod in pruned.named_modules()
                if isinstance(getattr(mod, "weight", None), nn.Parameter)
                and (mod.weight == 0).any() and not (dict(m.named_modules())[n].weight == 0).any()}

    channels = _try(lambda c: prune_channels_(c, ChannelPruneConfig(ratio=0.5), x), model)
    neurons = _try(lambda c: prune_channels_(c, NeuronPruneConfig(ratio=0.5), x,
                                             scope="neurons"), model)
    heads = _try(lambda c: prune_heads_(c, HeadPruneConfig(ratio=0.5), x), model)
    ptq = _try(lambda c: quantize_ptq_(c, [x], PTQConfig()), model)
    dynamic = _try(lambda c: quantize_dynamic_(c), model)
    weight_only = _try(lambda c: quantize_weight_only_(c, WeightOnlyConfig(method="rtn")), model)
    return {
        "prunable": sparsified(model),
        "prunable (structured)": _changed(model, channels) | _changed(model, neurons),
        "prunable (heads)": _changed(model, heads),
        "quantizable": _replaced_by(model, ptq, _QuantLayer),
        "quantizable (dynamic)": _replaced_by(model, dynamic,
                                              (DynamicQuantLinear, DynamicQuantLSTM,
                                               Int8Embedding)),
        "quantizable (weight-only)": _replaced_by(model, weight_only, _WeightOnlyLayer),
    }


def assert_check_agrees(model: nn.Module, x: torch.Tensor) -> dict:
    model.eval()
    rows = check_model(model, tuple(x.shape[1:]), example=x)
    done = what_steps_do(model, x)
    assert set(done) == set(MODULE_FACTS)
    for row in rows:
        name = "" if row.name == "(model)" else row.name
        for fact, changed in done.items():
            if row.params == 0:
                assert row.cells[fact] == "-", (row.name, fact)
                continue
            says = row.cells[fact] == "yes"
            assert says == (name in changed), (
                f"{row.name} ({row.type}) {fact}: check says {row.cells[fact]!r} but the step "
                f"{'changed' if name in changed else 'left'} it; why: {row.why_not}")
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    return {r.name: r for r in rows}


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("layer_type", list(CASES), ids=lambda t: t.__name__)
def test_check_agrees_with_the_steps(layer_type):
    factory, x = CASES[layer_type]
    torch.manual_seed(0)
    model = factory()
    rows = assert_check_agrees(model, x)
    assert layer_type in {type(m) for m in model.modules()}
    assert any(r.type == layer_type.__name__ for r in rows.values())
    assert layer_spec(layer_type) is LAYER_SPECS[layer_type]


def test_transposed_conv_is_channel_pruned_and_check_says_so():
    torch.manual_seed(0)
    model, x = ConvNet(2, transposed=True), _image(1, 8, 8)
    rows = assert_check_agrees(model, x)
    up = rows["up"]
    assert up.type == "ConvTranspose2d"
    assert up.cells["prunable (structured)"] == "yes"  # the bug: check said "no"
    assert up.cells["quantizable"] == "stays float"
    assert any("transposed convs have no static int8 form" in w for w in up.why_not)


def test_rows_add_up_to_the_models_parameters():
    torch.manual_seed(0)
    model = ViT()
    rows = {r.name: r for r in check_model(model, (1, 8, 8))}
    assert rows["(model)"].params == 8 * 32  # the positional embedding
    assert rows["attn"].params == 3 * 32 * 32 + 3 * 32  # in_proj_weight + in_proj_bias
    assert rows["attn.out_proj"].params == 32 * 32 + 32
    assert sum(r.params for r in rows.values()) == sum(p.numel() for p in model.parameters())
    assert rows["attn"].cells["prunable (heads)"] == "yes"
    assert rows["attn.out_proj"].cells["traceable"] == "yes"  # inside a traced leaf
    assert rows["mlp.0"].cells["prunable (heads)"] == "-"
    text = format_check(list(rows.values()))
    assert "prunable (heads) 2/2" in text


def test_tied_parameter_is_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    rows = check_model(model, (4,))
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters()) == 24


# ----------------------------------------------------------------------------- a user's layer


def _custom_layer_module():
    spec = importlib.util.spec_from_file_location("custom_layer_example",
                                                  ROOT / "recipes" / "custom_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registered_custom_layer_is_checked_pruned_and_rebuilt():
    from lighten.prune.structured import ChannelPruneConfig, prune_channels_

    example = _custom_layer_module()
    torch.manual_seed(0)
    model, x = example.build(num_classes=4).eval(), _image(1, 8, 8)
    rows = assert_check_agrees(model, x)
    for name in ("conv1", "conv2"):
        assert rows[name].type == "ScaledConv2d"
        assert rows[name].cells["traceable"] == "yes"  # one call in the graph, not inlined
        assert rows[name].cells["prunable (structured)"] == "yes"
        assert rows[name].cells["quantizable"] == "stays float"  # its spec names no int8 form

    prune_channels_(model, ChannelPruneConfig(ratio=0.5), x)
    assert model.conv1.out_channels == 8 and model.conv1.gain.shape == (8,)
    assert model.conv2.in_channels == 8 and model.conv2.weight.shape[:2] == (16, 8)
    assert model(x).shape == (1, 4)

    # artifact replay: the constructor facts rebuild the pruned layer; its tensors then load
    config = layer_config(model.conv2)
    assert config == {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1,
                      "bias": True}
    rebuilt = build_layer("ScaledConv2d", config)
    rebuilt.load_state_dict(model.conv2.state_dict())
    h = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(rebuilt(h), model.conv2(h))


def test_registering_a_spec_updates_every_table():
    class Twice(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Mine(nn.Module):
        pass

    assert layer_spec(Twice) is LAYER_SPECS[nn.Linear]  # a subclass slices like its base
    assert layer_spec(Twice, exact=True) is None and constructor_attrs(Twice) is None
    spec = register_layer_spec(LayerSpec(Mine, (), graph_kind="same", name="test_layer_Mine"))
    try:
        assert MODULE_KINDS[Mine] == "same" and Mine in MODULE_KINDS
        assert (Mine, "out") not in SURGERY and Mine not in QUANT_CLASSES
        assert isinstance(build_layer("test_layer_Mine", {}), Mine)
    finally:
        del LAYER_SPECS[Mine]
    assert Mine not in MODULE_KINDS and spec.name == "test_layer_Mine"
    with pytest.raises(ValueError, match="graph_kind"):
        register_layer_spec(LayerSpec(Mine, graph_kind="swirl"))
    with pytest.raises(ValueError, match="surgery kinds"):
        register_layer_spec(LayerSpec(Mine, surgery={"sideways": print}))


def test_old_tables_are_views_of_the_specs():
    assert MODULE_KINDS[nn.ConvTranspose2d] == "convt" and MODULE_KINDS[nn.Linear] == "linear"
    from lighten.prune import surgery

    assert SURGERY[(nn.ConvTranspose2d, "out")] is surgery.conv_transpose_out
    assert SURGERY[(nn.BatchNorm2d, "norm")] is surgery.batchnorm
    from lighten.quant.modules import QuantConv2d, QuantLinear, quant_class

    assert QUANT_CLASSES[nn.Conv2d] is QuantConv2d and QUANT_CLASSES[nn.Linear] is QuantLinear
    assert nn.ConvTranspose2d not in QUANT_CLASSES
    assert quant_class(nn.Conv2d(1, 1, 1)) is QuantConv2d


@pytest.mark.parametrize("layer", [
    nn.Conv1d(2, 4, 3, stride=2, bias=False), nn.Conv2d(4, 8, (3, 1), padding="same", groups=2),
    nn.Conv3d(1, 2, 3, padding_mode="reflect", padding=1), nn.ConvTranspose2d(4, 2, 3, stride=2,
                                                                             output_padding=1),
    nn.Linear(3, 5, bias=False), nn.BatchNorm2d(7, momentum=None), nn.LayerNorm(6, bias=False),
    nn.GroupNorm(2, 4), nn.Embedding(10, 3, padding_idx=0), nn.Identity()],
    ids=lambda m: type(m).__name__)
def test_constructor_attrs_rebuild_each_replayable_layer(layer):
    config = layer_config(layer)
    rebuilt = build_layer(type(layer).__name__, config)
    assert type(rebuilt) is type(layer) and layer_config(rebuilt) == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in layer.state_dict().items()}


def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, lighten.layers; "
            "print(sorted(m for m in sys.modules if m.startswith('lighten')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "['lighten', 'lighten.layers']"


def test_pruned_custom_layer_artifact_reloads(tmp_path):
    from lighten.artifact import load_artifact, save_artifact
    from lighten.prune.structured import ChannelPruneConfig, prune_channels_

    _custom_layer_module()
    torch.manual_seed(0)
    model_spec = {"python": str(ROOT / "recipes" / "custom_layer.py") + ":build",
                  "kwargs": {"num_classes": 4}, "input_shape": [1, 8, 8]}
    from lighten.models import ModelSpec, build_model

    model = build_model(ModelSpec(**model_spec), input_shape=(1, 8, 8), num_classes=4).eval()
    x = torch.randn(3, 1, 8, 8)
    prune_channels_(model, ChannelPruneConfig(ratio=0.5), x[:1])
    save_artifact(model, tmp_path / "pruned.safetensors", model_spec=model_spec,
                  input_shape=(1, 8, 8), num_classes=4)
    loaded, _ = load_artifact(tmp_path / "pruned.safetensors")
    assert loaded.conv1.out_channels == 8 and loaded.conv1.gain.shape == (8,)
    torch.testing.assert_close(loaded.eval()(x), model(x))
