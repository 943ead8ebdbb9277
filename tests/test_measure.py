"""Measurements: hand-checkable MACs, parameter and energy counts, metrics, robustness, rows."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.errors import DataError, ModelError
from lighten.measure import (
    accuracy,
    agreement,
    count_macs,
    count_macs_by_module,
    count_params,
    energy_estimate,
    macro_f1,
    measure_stage,
    recall_per_class,
    robustness,
    shift_rotate,
)
from lighten.measure.energy import DRAM_PJ_PER_64BIT, FP32_ADD_PJ, FP32_MULT_PJ, SRAM_PJ_PER_64BIT


class Int8Linear(nn.Module):
    """Minimal stand-in for a quantized layer: int8 weight buffer plus stored bit widths."""

    weight_bits = 8
    activation_bits = 8

    def __init__(self, linear: nn.Linear):
        super().__init__()
        scale = linear.weight.detach().abs().max() / 127
        self.register_buffer("weight_int", torch.round(linear.weight.detach() / scale)
                             .to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight_int.float() * self.scale, self.bias)


def test_macs_match_hand_formula():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (3, 10, 12)) == 8 * 10 * 12 * 3 * 3 * 3
    grouped = nn.Conv2d(4, 8, 3, groups=2)
    assert count_macs(grouped, (4, 6, 6)) == 8 * 4 * 4 * (4 // 2) * 3 * 3
    assert count_macs(nn.Linear(20, 7), (20,)) == 20 * 7
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    by_module = count_macs_by_module(net, (1, 8, 8))
    assert by_module == {"": 4 * 36 * 9 + 144 * 5, "0": 4 * 36 * 9, "3": 144 * 5}
    assert count_macs(net, (1, 8, 8)) == by_module[""]
    net.train()
    count_macs(net, (1, 8, 8))
    assert net.training  # mode restored
    with pytest.raises(ModelError, match="input shape"):
        count_macs(net, (3, 8, 8))


def test_count_params_counts_zeros_and_int_buffers():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[0] = 0
        lin.bias.zero_()
    assert count_params(lin) == (15, 8)
    bn = nn.BatchNorm1d(3)  # running stats are buffers, not weights
    assert count_params(nn.Sequential(lin, bn)) == (21, 11)  # BN: weight 1, bias 0
    q = Int8Linear(nn.Linear(4, 3))
    with torch.no_grad():
        q.weight_int[:, :2] = 0
    assert count_params(q) == (15, 6 + int(torch.count_nonzero(q.bias)))
    shared = nn.Sequential(lin, nn.ReLU(), lin)  # tied weights count once
    assert count_params(shared) == (15, 8)


def test_energy_hand_formula_and_int8_cheaper():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    est = energy_estimate(lin, (16,))
    compute = 16 * 8 * (FP32_MULT_PJ + FP32_ADD_PJ)
    weights = (16 * 8 + 8) * 32 / 64 * DRAM_PJ_PER_64BIT
    acts = (16 + 8) * 32 / 64 * SRAM_PJ_PER_64BIT
    assert est.pj_per_inference == pytest.approx(compute + weights + acts)
    assert est.breakdown["compute_pj"] == pytest.approx(compute)
    assert sum(est.breakdown.values()) == pytest.approx(est.pj_per_inference)
    assert est.sparse_pj == pytest.approx(est.pj_per_inference)  # dense weights: nothing skipped

    q = energy_estimate(Int8Linear(lin), (16,))
    assert q.pj_per_inference < 0.35 * est.pj_per_inference
    assert q.breakdown["compute_pj"] == pytest.approx(16 * 8 * (0.2 + 0.1))
    assert q.layers[0]["weight_bits"] == 8

    with torch.no_grad():
        lin.weight[:4] = 0  # half the rows: half the MACs skipped in the sparse variant
    sparse = energy_estimate(lin, (16,))
    assert sparse.pj_per_inference == pytest.approx(est.pj_per_inference)
    assert sparse.pj_per_inference - sparse.sparse_pj == pytest.approx(compute / 2)


def test_energy_nested_modules_not_double_counted():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    est = energy_estimate(net, (1, 8, 8))
    macs = sum(layer["macs"] for layer in est.layers)
    assert macs == count_macs(net, (1, 8, 8))
    assert est.breakdown["other_compute_pj"] == 0


def test_metrics():
    logits = torch.tensor([[2.0, 1, 0], [0, 3, 1], [0, 1, 5], [4, 0, 0]])
    labels = torch.tensor([0, 1, 1, 2])
    assert accuracy(logits, labels) == 0.5
    assert agreement(logits, logits.numpy() * 2) == 1.0
    assert agreement(logits, torch.roll(logits, 1, dims=1)) == 0.0
    assert recall_per_class(logits, labels) == {0: 1.0, 1: 0.5, 2: 0.0}
    from sklearn.metrics import f1_score

    assert macro_f1(logits, labels) == pytest.approx(
        f1_score(labels.numpy(), logits.argmax(1).numpy(), average="macro"))
    with pytest.raises(DataError, match="labels for 4 predictions"):
        accuracy(logits, labels[:3])
    with pytest.raises(DataError, match="shape"):
        accuracy(torch.zeros(0, 3), labels[:0])


def _blob_data(n=300, seed=0):
    """Images whose class is the quadrant holding a bright blob: learnable by a fixed rule."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.1
    y = torch.randint(0, 4, (n,), generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, r * 4 + 1 : r * 4 + 3, col * 4 + 1 : col * 4 + 3] += 3.0
    return TensorDataset(x, y)


def _quadrant_logits(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), 8, 8)
    return np.stack([x[:, :4, :4].sum((1, 2)), x[:, :4, 4:].sum((1, 2)),
                     x[:, 4:, :4].sum((1, 2)), x[:, 4:, 4:].sum((1, 2))], axis=1)


def test_robustness_keys_and_ranges():
    data = _blob_data()
    r = robustness(_quadrant_logits, data, samples=200, noise_std=0.5, seed=1)
    assert set(r) == {"robust_clean_acc", "robust_noise_acc", "robust_shift_acc"}
    assert r["robust_clean_acc"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert r["robust_shift_acc"] < 1.0  # shifts push blobs across quadrant borders
    same = robustness(_quadrant_logits, data, samples=200, noise_std=0.0, shift_pixels=0,
                      rotate_degrees=0.0)
    assert same["robust_noise_acc"] == same["robust_shift_acc"] == same["robust_clean_acc"]
    flat = TensorDataset(torch.randn(50, 6), torch.randint(0, 3, (50,)))
    r = robustness(lambda x: x[:, :3], flat, samples=20)
    assert r["robust_shift_acc"] is None and 0 <= r["robust_noise_acc"] <= 1
    with pytest.raises(DataError, match="samples"):
        robustness(_quadrant_logits, data, samples=0)


def test_shift_is_exact_for_whole_pixels():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    g = torch.Generator().manual_seed(3)
    out = shift_rotate(x, shift_pixels=2, rotate_degrees=0.0, generator=g)
    g = torch.Generator().manual_seed(3)
    dx, dy = torch.randint(-2, 3, (1, 2), generator=g)[0].tolist()
    rolled = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    inner = (slice(None), slice(None), slice(2, 6), slice(2, 6))
    torch.testing.assert_close(out[inner], rolled[inner])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_measure_stage_row(tmp_path, backend):
    from lighten.backends import get_backend
    from lighten.data import bundle_from_datasets

    data = bundle_from_datasets(_blob_data(200, seed=1), _blob_data(300, seed=2), name="blobs")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 64, 4))
    compiled = get_backend(backend, threads=1).compile(model, input_shape=(1, 8, 8),
                                                       workdir=tmp_path)
    row, logits = measure_stage(model, stage="baseline", step=None, data=data, compiled=compiled,
                                reference_logits=None, artifact_bytes=1234, seconds=0.5,
                                eval_limit=260, latency_runs=3)
    keys = ["stage", "step", "accuracy", "agreement", "params", "nonzero_params", "bytes", "macs",
            "latency_ms_b1", "latency_ms_b64", "backend", "seconds", "energy_uj",
            "robust_noise_acc", "robust_shift_acc", "macro_f1", "onnx_bytes"]
    assert all(k in row for k in keys)
    assert logits.shape == (260, 4) and logits.dtype == torch.float32
    assert row["agreement"] == 1.0 and row["bytes"] == 1234 and row["backend"] == backend
    assert row["params"] == 4 * 9 + 4 + 256 * 4 + 4
    assert row["macs"] == 4 * 64 * 9 + 256 * 4
    assert 0 <= row["accuracy"] <= 1 and row["latency_ms_b1"] > 0 and row["energy_uj"] > 0
    labels = torch.stack([data.test[i][1] for i in range(260)])
    assert row["accuracy"] == pytest.approx(accuracy(logits, labels))
    with torch.no_grad():
        ref = model(torch.stack([data.test[i][0] for i in range(260)]))
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    if backend == "onnxruntime":
        assert row["onnx_bytes"] == compiled.bytes_on_disk > 0
    else:
        assert row["onnx_bytes"] is None
    second, _ = measure_stage(model, stage="again", step="x", data=data, compiled=compiled,
                              reference_logits=-logits, artifact_bytes=1, seconds=0,
                              eval_limit=260, robustness=False, latency_runs=3)
    assert second["agreement"] < 0.5 and "robust_noise_acc" not in second


def test_multihead_attention_macs_are_counted():
    """The fused MHA fast path hides its matmuls from the flop counter; count them anyway."""
    from torch import nn

    from lighten.measure import count_macs

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    tokens, dim = 8, 32
    projections = 4 * tokens * dim * dim  # q, k, v and out projections
    scores = 2 * tokens * tokens * dim  # q·kᵀ and attention·v
    assert count_macs(Attn(), (tokens, dim)) == projections + scores


def test_quantized_lstm_and_grouped_weights_count_their_real_weights():
    from lighten.quant.dynamic import quantize_dynamic_
    from lighten.quant.weight_only import WeightOnlyConfig, quantize_weight_only_

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(6, 12, batch_first=True), nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    model = Seq()
    floats = count_params(model)[0]
    float_energy = energy_estimate(model, (5, 6))
    quantize_dynamic_(model)
    assert count_params(model)[0] == floats  # int8 LSTM weights are weights too
    dynamic_energy = energy_estimate(model, (5, 6))  # int8 MACs, int8 weights read
    assert dynamic_energy.pj_per_inference < 0.5 * float_energy.pj_per_inference

    conv = nn.Sequential(nn.Conv2d(8, 4, 3))  # 72 columns: groups of 32 pad to 96
    params = count_params(conv)[0]
    quantize_weight_only_(conv, WeightOnlyConfig(bits=4, group_size=32, method="rtn"))
    assert tuple(conv[0].weight_int.shape) == (4, 3, 32)
    assert count_params(conv)[0] == params
    assert energy_estimate(conv, (8, 5, 5)).layers[0]["weight_bits"] == 4


def test_a_module_naming_its_integer_weights_has_them_counted():
    class Codes(nn.Module):
        integer_weight_names = ("codes",)

        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.ones(4, 3, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(4))
            self.bias = nn.Parameter(torch.zeros(4))

    assert count_params(nn.Sequential(Codes())) == (16, 12)


def test_a_weight_normalized_layer_counts_its_weight_in_the_energy():
    from torch.nn.utils.parametrizations import weight_norm

    plain = nn.Sequential(nn.Linear(16, 8))
    normed = nn.Sequential(weight_norm(nn.Linear(16, 8)))
    assert energy_estimate(normed, (16,)).pj_per_inference == pytest.approx(
        energy_estimate(plain, (16,)).pj_per_inference)
