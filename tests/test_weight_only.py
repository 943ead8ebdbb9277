"""quant.weight_only: group-wise low-bit weights, GPTQ vs round-to-nearest, packing, ONNX."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from lighten.artifact import describe_artifact, load_artifact, save_artifact
from lighten.data import DataBundle
from lighten.errors import DataError, UnsupportedError
from lighten.quant.quantizer import sqnr_db
from lighten.quant.weight_only import (
    WeightOnlyConfig,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    make_grid,
    quantize_weight_only_,
    rtn_quantize,
)
from lighten.step import StepContext
from lighten.training import TrainConfig

SPEC = {"python": "tests/nowhere.py:net", "input_shape": [1]}


def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Inputs on a low-rank subspace plus a little noise: what GPTQ's Hessian exploits."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 8, generator=g) @ basis + 0.05 * torch.randn(n, dim, generator=g)


def linear_model(d_in=64, d_out=32, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out)).eval()


def output_mse(model, reference, x) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).pow(2).mean())


def test_rtn_matches_the_textbook_formula():
    w = torch.randn(6, 10)
    grid = make_grid(4, symmetric=True)
    q, scale, zero = rtn_quantize(w, group_size=5, grid=grid)
    for g in range(2):
        block = w[:, g * 5 : (g + 1) * 5]
        s = (block.abs().amax(1) / 7).half().float()
        assert torch.equal(scale[:, g], s) and not zero.any()
        assert torch.equal(q[:, g * 5 : (g + 1) * 5],
                           torch.clamp(torch.round(block / s[:, None]), -8, 7).int())
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    # asymmetric: the range [min, max] (with 0) maps onto [-8, 7]
    qa, sa, za = rtn_quantize(w, group_size=10, grid=make_grid(4, symmetric=False))
    err = ((qa - za) * sa).float() - w
    assert float(err.abs().max()) <= float(sa.max()) / 2 + 1e-6


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    float_model = linear_model()
    calib, held_out = correlated_inputs(512, 64, seed=1), correlated_inputs(512, 64, seed=2)
    errors = {}
    for method in ("rtn", "gptq"):
        cfg = WeightOnlyConfig(bits=bits, group_size=16, method=method)
        q = quantize_weight_only_(copy.deepcopy(float_model), cfg, [calib[:256], calib[256:]])
        errors[method] = output_mse(q, float_model, held_out)
    assert errors["gptq"] < 0.7 * errors["rtn"], errors


def test_gptq_on_conv_uses_im2col_and_beats_rtn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    g = torch.Generator().manual_seed(3)
    base = torch.randn(96, 1, 10, 10, generator=g)  # channels strongly correlated
    x = base.repeat(1, 4, 1, 1) + 0.1 * torch.randn(96, 4, 10, 10, generator=g)
    errors = {}
    for method in ("rtn", "gptq"):
        q = quantize_weight_only_(copy.deepcopy(model),
                                  WeightOnlyConfig(bits=3, group_size=-1, method=method), [x[:64]])
        assert isinstance(q[0], WeightOnlyConv2d) and isinstance(q[2], WeightOnlyConv2d)
        errors[method] = output_mse(q, model, x[64:])
    assert errors["gptq"] < errors["rtn"], errors


def test_eight_bit_is_close_to_float_and_four_bit_reasonably_close():
    model = linear_model(128, 64)
    x = torch.randn(256, 128)
    with torch.no_grad():
        ref = model(x)
        y8 = quantize_weight_only_(copy.deepcopy(model), WeightOnlyConfig(bits=8, method="rtn"))(x)
        y4 = quantize_weight_only_(copy.deepcopy(model), WeightOnlyConfig(bits=4), [x])(x)
    assert sqnr_db(ref, y8) > 35 and sqnr_db(ref, y4) > 15


def test_bias_correction_removes_the_mean_output_shift():
    model = linear_model(64, 32, seed=4)
    x = correlated_inputs(1024, 64, seed=5) + 2.0  # a large input mean makes the shift visible
    shifts = {}
    for correct in (False, True):
        q = quantize_weight_only_(copy.deepcopy(model),
                                  WeightOnlyConfig(bits=2, group_size=-1, method="rtn",
                                                   bias_correction=correct), [x])
        with torch.no_grad():
            shifts[correct] = float((q(x) - model(x)).mean(0).abs().mean())
    assert shifts[True] < 0.05 * shifts[False], shifts


@pytest.mark.parametrize(("bits", "group_size", "limit"),
                         [(4, -1, 4.1 / 32), (4, 32, 4.6 / 32), (3, 64, 3.35 / 32),
                          (2, -1, 2.1 / 32)])
def test_packed_artifact_is_about_bits_over_32_of_float(tmp_path, bits, group_size, limit):
    model = linear_model(1024, 512)
    float_bytes = save_artifact(model, tmp_path / "f.safetensors", model_spec=SPEC,
                                input_shape=(1024,), num_classes=512)
    q = quantize_weight_only_(copy.deepcopy(model),
                              WeightOnlyConfig(bits=bits, group_size=group_size, method="rtn"))
    path = tmp_path / "q.safetensors"
    q_bytes = save_artifact(q, path, model_spec=SPEC, input_shape=(1024,), num_classes=512)
    assert q_bytes / float_bytes < limit, q_bytes / float_bytes
    rows = {r["name"]: r for r in describe_artifact(path)}
    if bits > 2:
        assert bits / 32 < q_bytes / float_bytes
        assert rows["0.weight_int"]["encoding"] == "packed_bits"
        assert rows["0.weight_int"]["bytes"] == 1024 * 512 * bits // 8
    else:  # symmetric 2-bit codes are ternary (-1, 0, 1): a zero mask + 1-bit signs is smaller
        assert rows["0.weight_int"]["encoding"] == "sparse_palette"
        assert rows["0.weight_int"]["bytes"] < 1024 * 512 * bits // 8
    loaded, _ = load_artifact(path, model=linear_model(1024, 512))
    assert isinstance(loaded[0], WeightOnlyLinear)
    x = torch.randn(4, 1024)
    assert torch.equal(loaded(x), q(x))


def test_onnx_export_keeps_int8_weights_and_matches(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from lighten.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(32, 1, 6, 6)
    q = quantize_weight_only_(model, WeightOnlyConfig(bits=4, group_size=20), [x])  # 288 % 20 > 0
    check = export_onnx(q, tmp_path / "m.onnx", input_shape=(1, 6, 6), sample_inputs=x)
    assert check.max_abs_diff < 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    int8 = sum(v.size for v in inits.values() if v.dtype == np.int8)
    floats = sum(v.size for v in inits.values() if v.dtype == np.float32)  # scales, biases
    assert int8 >= 8 * 9 + 10 * 288 and floats < int8 / 10
    assert "DequantizeLinear" in {n.op_type for n in proto.graph.node}


def test_step_from_registry_with_notes_and_finetune():
    from lighten.registry import get_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    xs, ys = torch.randn(64, 2, 6, 6), torch.randint(0, 3, (64,))
    ds = TensorDataset(xs, ys)
    ctx = StepContext(data=DataBundle("tiny", ds, ds, (2, 6, 6), 3),
                      train_config=TrainConfig(batch_size=16), baseline=None, workdir=None,
                      progress=False)
    spec = get_step("quant.weight_only")
    cfg = spec.config_type(bits=4, group_size=8, method="gptq", calib_samples=32,
                           finetune={"epochs": 1})
    bias_before = model[3].bias.detach().clone()
    out = spec.apply(model, cfg, ctx)
    assert isinstance(out[0], WeightOnlyConv2d) and isinstance(out[3], WeightOnlyLinear)
    assert any("grouped conv" in n for n in ctx.notes)
    assert not torch.equal(out[3].bias.detach(), bias_before)  # fine-tuning moved the bias


def test_bad_input_raises_one_line_errors():
    with pytest.raises(ValidationError, match="group_size"):
        WeightOnlyConfig(group_size=0)
    with pytest.raises(ValidationError):
        WeightOnlyConfig(bits=9)
    with pytest.raises(ValidationError):
        WeightOnlyConfig(method="magic")
    with pytest.raises(DataError, match="needs calibration inputs"):
        quantize_weight_only_(linear_model(), WeightOnlyConfig(method="gptq"))
    with pytest.raises(UnsupportedError, match="no module named 'nope'"):
        quantize_weight_only_(linear_model(), WeightOnlyConfig(method="rtn", ignore=["nope"]))
    with pytest.raises(UnsupportedError, match="no nn.Linear / nn.Conv2d"):
        quantize_weight_only_(nn.Sequential(nn.ReLU()), WeightOnlyConfig(method="rtn"))
