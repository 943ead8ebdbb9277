"""Every step after a pruning step keeps its zeros (issue 10: "GPTQ undoes pruning").

For every quantization step after every unstructured pruning step, each pruned layer's
(dequantized) weight has no more non-zeros than after pruning and every pruned position is
still exactly 0; fine-tuning keeps masks; masked GPTQ still beats round-to-nearest.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lighten
from lighten.data import DataSpec, load_data
from lighten.quant import gptq as gptq_module
from lighten.quant.weight_only import (
    WeightOnlyConfig,
    make_grid,
    quantize_weight_only_,
    rtn_quantize,
)
from lighten.step import FinetuneConfig, StepContext
from lighten.training import TrainConfig, pruned_masks

PRUNE = {
    "prune.magnitude": {"sparsity": 0.7},
    "prune.nm": {"n": 2, "m": 4},
    "prune.l1": {"lam": 1e-4, "sparsity": 0.6, "finetune": {"epochs": 1}},
}
QUANT = {
    "quant.ptq": {"bits": 8, "calib_samples": 32},
    "quant.ptq asymmetric w4": {"bits": 8, "weight_bits": 4, "symmetric": False,
                                "calib_samples": 32},
    "quant.dynamic": {"bits": 8},
    "quant.weight_only rtn": {"bits": 4, "method": "rtn", "group_size": 16},
    "quant.weight_only rtn asymmetric": {"bits": 3, "method": "rtn", "symmetric": False,
                                         "group_size": 16},
    "quant.weight_only gptq": {"bits": 4, "method": "gptq", "group_size": 16,
                               "calib_samples": 32, "bias_correction": True},
    "quant.weight_only adaround": {"bits": 4, "method": "adaround", "adaround_iters": 30,
                                   "calib_samples": 32},
    "quant.qat": {"weight_bits": 4, "calib_samples": 32, "finetune": {"epochs": 2, "lr": 0.05}},
    "quant.mixed": {"budget_bytes": 0.2, "candidates": [4, 8], "calib_samples": 32},
}


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8]))


def tiny_net(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, num_classes))


_PRUNED: dict[str, nn.Module] = {}


def pruned(step: str, data) -> nn.Module:
    if step not in _PRUNED:
        _PRUNED[step], _ = lighten.compress(tiny_net(data.num_classes), {step: PRUNE[step]},
                                            data=data)
    return _PRUNED[step]


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each layer's weight as the model computes with it (dequantized where quantized)."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "dequantized_weight"):
            out[name] = m.dequantized_weight().detach()
        elif isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2:
            out[name] = m.weight.detach()
    return out


def assert_zeros_kept(before: nn.Module, after: nn.Module, *, expect: set[str] | None = None):
    zeros = {n: w == 0 for n, w in weights_of(before).items() if (w == 0).any()}
    assert zeros, "the pruning step left no zeros"
    now = weights_of(after)
    if expect is not None:
        assert expect <= set(now), f"layers missing after the step: {expect - set(now)}"
    for name, zero in zeros.items():
        w = now[name].reshape(zero.shape)
        assert int((w != 0).sum()) <= int((~zero).sum()), f"{name} gained non-zeros"
        assert not w[zero].any(), f"{name}: {int((w[zero] != 0).sum())} pruned weights regrew"
        assert w[~zero].abs().sum() > 0, f"{name} became all zero"


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("prune", list(PRUNE))
def test_quantization_after_pruning_keeps_every_zero(prune, quant, data):
    model = pruned(prune, data)
    step = quant.split()[0]
    out, report = lighten.compress(model, {step: QUANT[quant]}, data=data)
    kinds = {n for n, m in out.named_modules() if hasattr(m, "dequantized_weight")}
    assert kinds, f"{step} quantized nothing"
    assert_zeros_kept(model, out, expect=kinds)


def test_the_issue_case_gptq_after_magnitude_does_not_add_non_zeros(data):
    model = pruned("prune.magnitude", data)
    before = sum(int((w != 0).sum()) for w in weights_of(model).values())
    out, report = lighten.compress(model, {"quant.weight_only": {"bits": 4, "method": "gptq"}},
                                   data=data)
    after = sum(int((w != 0).sum()) for w in weights_of(out).values())
    assert after <= before
    assert any("pruned zeros kept" in n for n in report.notes)


def _context(data) -> StepContext:
    return StepContext(data=data, train_config=TrainConfig(lr=0.05, batch_size=16),
                       baseline=None, workdir=None, progress=False)


def test_finetune_keeps_pruned_zeros_and_regrows_them_only_when_asked(data):
    model = pruned("prune.magnitude", data)
    zeros = _zero_masks(model)
    for keep_zeros in (True, False):
        tuned, ctx = _copy(model), _context(data)
        if keep_zeros:
            ctx.finetune(tuned, FinetuneConfig(epochs=2))
        else:  # said up front: a note in the Report and a warning
            with pytest.warns(UserWarning, match="does not keep pruned zeros"):
                ctx.finetune(tuned, FinetuneConfig(epochs=2), keep_zeros=False)
            assert any("does not keep pruned zeros" in n for n in ctx.notes)
        now = weights_of(tuned)
        regrown = sum(int((now[n][z] != 0).sum()) for n, z in zeros.items())
        assert (regrown == 0) == keep_zeros, (keep_zeros, regrown)


def test_a_later_steps_finetune_keeps_zeros_of_the_layers_it_trains(data):
    model = pruned("prune.magnitude", data)
    # quant.ptq leaves the ignored layers in float; its fine-tune trains them
    out, _ = lighten.compress(model, {"quant.ptq": {"ignore": ["7", "9"], "calib_samples": 32,
                                                    "finetune": {"epochs": 2, "lr": 0.05}}},
                              data=data)
    assert isinstance(out[7], nn.Linear) and not torch.equal(out[7].weight, model[7].weight)
    assert_zeros_kept(model, out)


def test_pruned_masks_rule():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[0, :2] = 0  # pruned: some zeros
        net[1].weight.zero_()  # zero-initialized, not pruned: may train
        net[2].weight[1] = 0  # a BN channel zeroed by prune.l1 target: bn (scale and shift)
        net[2].bias[1] = 0
    weights, masks = pruned_masks(net)
    assert set(weights) == {"0.weight", "2.weight", "2.bias"}
    assert int((~masks["0.weight"]).sum()) == 2 and not masks["2.bias"][1]


def test_masked_gptq_beats_rtn_on_the_kept_weights(monkeypatch):
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 64, generator=g)
    x = torch.randn(1024, 8, generator=g) @ basis + 0.05 * torch.randn(1024, 64, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    with torch.no_grad():
        w = model[0].weight
        w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.6 * w.numel())).values)
    zero = model[0].weight == 0
    with torch.no_grad():
        reference = model(x)
    batches = list(x.split(256))

    def quantized(method):
        q = quantize_weight_only_(_copy(model), WeightOnlyConfig(bits=3, group_size=32,
                                                                 method=method), batches)
        wq = q[0].dequantized_weight().detach()
        assert not wq[zero].any() and int((wq != 0).sum()) <= int((~zero).sum())
        with torch.no_grad():
            return float((q(x) - reference).pow(2).mean())

    rtn = quantized("rtn")
    exact = quantized("gptq")
    assert exact < 0.7 * rtn, (exact, rtn)
    monkeypatch.setattr(gptq_module, "EXACT_BUDGET", 0)  # the shared-factor (SparseGPT) path
    shared = quantized("gptq")
    assert shared < rtn, (shared, rtn)
    assert exact <= shared * 1.05, (exact, shared)


def test_gptq_and_rtn_agree_on_zero_codes_for_asymmetric_grids():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    w[torch.rand_like(w) < 0.5] = 0
    grid = make_grid(3, symmetric=False)
    h = torch.eye(32) * 2
    q, scale, zero = gptq_module.gptq_quantize(w, h, group_size=16, grid=grid, mask=w != 0)
    deq = (q - zero.repeat_interleave(16, 1)) * scale.repeat_interleave(16, 1)
    assert not deq[w == 0].any()
    qr, sr, zr = rtn_quantize(w, group_size=16, grid=grid)
    assert not ((qr - zr.repeat_interleave(16, 1)) * sr.repeat_interleave(16, 1))[w == 0].any()


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: w == 0 for n, w in weights_of(model).items()}
