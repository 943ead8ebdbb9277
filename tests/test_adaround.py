"""AdaRound: learned up/down rounding on the RTN grid, same storage, lower output error."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import DataError
from lighten.quant.adaround import (
    adaround_quantize,
    beta_at,
    collect_rows,
    rectified_sigmoid,
)
from lighten.quant.gptq import weight_inputs
from lighten.quant.weight_only import (
    WeightOnlyConfig,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    make_grid,
    quantize_weight_only_,
    rtn_quantize,
)

SPEC = {"python": "tests/nowhere.py:net", "input_shape": [1, 8, 8]}


def correlated(n: int, dim: int, seed: int) -> torch.Tensor:
    """Inputs on a low-rank subspace: output error then depends on how errors combine."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, dim, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 6, generator=g) @ basis + 0.05 * torch.randn(n, dim, generator=g)


def dequantize(q, scale, zero, group_size):
    s = scale.repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    return (q.float() - z) * s


def conv_linear_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


def test_rectified_sigmoid_and_beta_schedule():
    h = rectified_sigmoid(torch.tensor([-50.0, 0.0, 50.0]))
    assert h.tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert beta_at(0, 100) is None and beta_at(19, 100) is None  # warm-up: no regularizer
    assert beta_at(20, 100) == pytest.approx(20.0) and beta_at(99, 100) == pytest.approx(2.0)
    assert 2.0 < beta_at(60, 100) < 20.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_within_one_step_of_rtn_and_output_error_lower(symmetric):
    torch.manual_seed(0)
    w = 0.1 * torch.randn(24, 48)
    x = correlated(512, 48, seed=1)
    grid = make_grid(4, symmetric)
    q_rtn, s_rtn, z_rtn = rtn_quantize(w, group_size=16, grid=grid)
    q, s, z = adaround_quantize(w, x, group_size=16, grid=grid, iters=200)
    assert torch.equal(s, s_rtn) and torch.equal(z, z_rtn)  # RTN grid kept
    assert int((q - q_rtn).abs().max()) <= 1 and bool((q != q_rtn).any())
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    err_rtn = float((x @ (dequantize(q_rtn, s, z, 16) - w).T).pow(2).mean())
    err_ada = float((x @ (dequantize(q, s, z, 16) - w).T).pow(2).mean())
    assert err_ada < 0.5 * err_rtn, (err_ada, err_rtn)


def test_conv_rows_are_im2col_and_error_drops_on_the_layer():
    model = conv_linear_model()
    x = torch.randn(16, 1, 8, 8)
    conv = model[2]
    rows = collect_rows(model, conv, [x[:8], x[8:]], max_rows=200)
    assert rows.shape == (200, 6 * 9)  # 100 random positions from each batch
    all_rows = weight_inputs(conv, torch.relu(model[0](x)).detach())
    assert bool((rows[:, None, :] == all_rows[None]).all(-1).any(-1).all())  # real im2col rows
    w = conv.weight.detach().reshape(8, -1)
    grid = make_grid(3, True)
    q_rtn, s, z = rtn_quantize(w, group_size=27, grid=grid)
    q, _, _ = adaround_quantize(w, rows, group_size=27, grid=grid, iters=150)
    err = {name: float((all_rows @ (dequantize(codes, s, z, 27) - w).T).pow(2).mean())
           for name, codes in (("rtn", q_rtn), ("ada", q))}
    assert err["ada"] < err["rtn"], err


def test_end_to_end_export_and_artifact_round_trip(tmp_path):
    pytest.importorskip("onnxruntime")
    from lighten.export import export_onnx

    model = conv_linear_model()
    x = torch.randn(48, 1, 8, 8)
    calib, held_out = x[:32], x[32:]
    outputs = {}
    for method in ("rtn", "adaround"):
        extra = {"adaround_iters": 80} if method == "adaround" else {}
        cfg = WeightOnlyConfig(bits=3, group_size=16, method=method, **extra)
        q = quantize_weight_only_(copy.deepcopy(model), cfg, [calib[:16], (calib[16:], None)])
        with torch.no_grad():
            outputs[method] = float((q(held_out) - model(held_out)).pow(2).mean())
    assert isinstance(q[0], WeightOnlyConv2d) and isinstance(q[5], WeightOnlyLinear)
    assert outputs["adaround"] < outputs["rtn"], outputs
    check = export_onnx(q, tmp_path / "m.onnx", input_shape=(1, 8, 8), sample_inputs=held_out)
    assert check.max_abs_diff < 1e-4
    path = tmp_path / "q.safetensors"
    save_artifact(q, path, model_spec=SPEC, input_shape=(1, 8, 8), num_classes=10)
    loaded, _ = load_artifact(path, model=conv_linear_model())
    for name in ("0", "2", "5"):
        assert torch.equal(loaded.get_submodule(name).weight_int, q.get_submodule(name).weight_int)
    assert torch.equal(loaded(held_out), q(held_out))


def test_grouped_conv_falls_back_to_rtn_with_a_note():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    notes: list[str] = []
    quantize_weight_only_(model, WeightOnlyConfig(method="adaround", adaround_iters=5),
                          [torch.randn(8, 2, 6, 6)], notes=notes)
    assert any("grouped conv" in n and "instead of adaround" in n for n in notes)


def test_bad_input_raises_one_line_errors():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(DataError, match="method=adaround .* needs calibration inputs"):
        quantize_weight_only_(model, WeightOnlyConfig(method="adaround"))
    with pytest.raises(DataError, match=r"shape \(N, 8\)"):
        adaround_quantize(torch.randn(4, 8), torch.randn(10, 5), group_size=8,
                          grid=make_grid(4, True))
    with pytest.raises(DataError, match="calibration inputs that reach the layer"):
        collect_rows(model, model[0], [])
    with pytest.raises(ValidationError):
        WeightOnlyConfig(method="adaround", adaround_iters=0)
    with pytest.raises(ValidationError):
        WeightOnlyConfig(method="adaround", adaround_reg=-1)
