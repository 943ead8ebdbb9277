"""Regressions found by trying lighten on architectures it had not seen."""

import textwrap

import pytest
import torch
from torch import nn

from lighten.export import export_onnx
from lighten.quant import PTQConfig
from lighten.quant.dynamic import DynamicConfig, quantize_dynamic_
from lighten.quant.ptq import quantize_ptq_
from lighten.quant.weight_only import WeightOnlyConfig, quantize_weight_only_


def tiny_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    return nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, num_layers=1,
                                                                 enable_nested_tensor=False),
                         nn.Flatten(), nn.Linear(16 * 8, 4)).eval()


@pytest.mark.parametrize("quantize", ["ptq", "dynamic", "weight_only"])
def test_transformer_encoder_linears_are_quantized_after_unfusing(quantize, tmp_path):
    model = tiny_encoder()
    x = torch.randn(4, 8, 8)
    notes: list[str] = []
    if quantize == "ptq":
        quantize_ptq_(model, [x], PTQConfig(), notes=notes)
    elif quantize == "dynamic":
        quantize_dynamic_(model, DynamicConfig(), notes=notes)
    else:
        quantize_weight_only_(model, WeightOnlyConfig(method="rtn"), notes=notes)
    encoder_layer = model[1].layers[0]  # unfused first (lighten.unfused): plain Linears
    assert type(encoder_layer.linear1) is not nn.Linear
    assert type(encoder_layer.self_attn.q_proj) is not nn.Linear
    assert any("unfused 1 PyTorch transformer block" in n for n in notes)
    assert type(model[3]) is not nn.Linear  # the head outside the encoder is quantized
    check = export_onnx(model, tmp_path / "m.onnx", input_shape=(8, 8), sample_inputs=x)
    assert check.agreement >= 0.75


def test_dynamic_quantized_graph_gets_the_quantized_tolerance(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, groups=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    quantize_dynamic_(model, DynamicConfig())
    check = export_onnx(model, tmp_path / "d.onnx", input_shape=(1, 8, 8))
    assert check.quantized


def test_global_pruning_warns_when_a_layer_is_emptied():
    from lighten.prune.magnitude import sparsity_notes

    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, 0] = 1.0  # 1 of 1000 weights left
    weights = {"0": model[0].weight, "1": model[1].weight}
    notes = sparsity_notes("prune.magnitude", model, weights)
    warnings = [n for n in notes if "WARNING" in n]
    assert warnings == ["prune.magnitude: WARNING 1 keeps only 0.10% of its weights; add it to "
                        "ignore: or use scope: layer"]
    assert "of all parameters" in notes[0]


def test_baseline_cache_key_follows_the_model_code(tmp_path, monkeypatch):
    from lighten.baseline import cache_path as _cache_path
    from lighten.recipe import load_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text("def build():\n    return None\n")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(textwrap.dedent("""
        name: t
        model: {python: net.py:build, input_shape: [1, 8, 8]}
        data: {name: digits}
    """))
    recipe = load_recipe(recipe_file)
    assert recipe.model.python.startswith(str(tmp_path.resolve()))  # absolute in artifacts
    before = _cache_path(recipe)
    (tmp_path / "net.py").write_text("def build():\n    return 1\n")
    assert _cache_path(recipe) != before
