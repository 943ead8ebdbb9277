"""prune.nm: exact N:M pattern per group, padding of short rows, bytes drop, ONNX parity."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lighten.artifact import load_artifact, save_artifact
from lighten.prune.magnitude import prunable_weights
from lighten.prune.nm import NMPruneConfig, nm_mask, padded_layers, prune_nm_

SPEC = {"python": "tests/nowhere.py:tiny_cnn", "input_shape": [1, 8, 8]}


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(  # conv rows have 1*3*3 = 9 inputs: not a multiple of 4
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def groups_of(t, m):
    rows = t.reshape(t.shape[0], -1)
    return F.pad(rows, (0, -rows.shape[1] % m)).view(rows.shape[0], -1, m)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_every_group_keeps_exactly_n_largest(n, m):
    model = tiny_cnn()
    before = {k: w.detach().clone() for k, w in prunable_weights(model).items()}
    prune_nm_(model, NMPruneConfig(n=n, m=m))
    for name, w in prunable_weights(model).items():
        length = w[0].numel()
        kept = groups_of(w != 0, m).sum(-1)  # (out, groups)
        full = length // m
        assert (kept[:, :full] == n).all(), name  # random weights: no ties, no true zeros
        if length % m:  # the padded last group keeps min(n, its real size)
            assert (kept[:, full] == min(n, length % m)).all()
        # inside each group every kept |w| is >= every pruned |w|
        old = groups_of(before[name].abs(), m)
        keep = groups_of(w != 0, m)
        kept_min = torch.where(keep, old, torch.inf).amin(-1)
        pruned_max = torch.where(keep, -torch.inf, old).amax(-1)
        assert (kept_min >= pruned_max).all()
        assert torch.equal(w[w != 0], before[name][w != 0])  # survivors unchanged


def test_mask_pads_short_rows_and_names_them():
    w = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 0.5]])  # 6 = one group of 4 + 2 padded
    assert nm_mask(w, 2, 4).tolist() == [[True, False, True, False, True, True]]
    assert nm_mask(w, 1, 4).tolist() == [[True, False, False, False, True, False]]
    assert padded_layers(prunable_weights(tiny_cnn()), 4) == ["0"]
    assert padded_layers(prunable_weights(tiny_cnn()), 8) == ["0"]
    assert padded_layers(prunable_weights(tiny_cnn()), 2) == ["0"]


def test_bytes_drop_outputs_keep_shape_and_artifact_roundtrips(tmp_path):
    model = tiny_cnn()
    x = torch.randn(5, 1, 8, 8)
    dense = save_artifact(model, tmp_path / "dense.safetensors", model_spec=SPEC,
                          input_shape=(1, 8, 8), num_classes=4, meta={})
    prune_nm_(model, NMPruneConfig(n=1, m=4))
    sparse = save_artifact(model, tmp_path / "nm.safetensors", model_spec=SPEC,
                           input_shape=(1, 8, 8), num_classes=4, meta={})
    assert sparse < 0.6 * dense  # 1:4 keeps ~25% of the weights plus a 1-bit mask
    loaded, _ = load_artifact(tmp_path / "nm.safetensors", model=tiny_cnn())
    assert loaded.eval()(x).shape == (5, 4)
    assert torch.equal(loaded(x), model.eval()(x))


def test_onnx_export_matches(tmp_path):
    from lighten.export import export_onnx

    model = tiny_cnn()
    prune_nm_(model, NMPruneConfig(n=2, m=4))
    check = export_onnx(model.eval(), tmp_path / "nm.onnx", input_shape=(1, 8, 8),
                        sample_inputs=torch.randn(16, 1, 8, 8))
    assert check.max_abs_diff < 1e-4 and check.agreement == 1.0


def _context(n=64):
    from lighten.data import DataBundle
    from lighten.step import StepContext
    from lighten.training import TrainConfig

    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return StepContext(data=DataBundle("tiny", ds, ds, (1, 8, 8), 4),
                       train_config=TrainConfig(lr=1e-2, batch_size=16), baseline=None,
                       workdir=None, progress=False)


def test_step_keeps_pattern_through_finetuning_and_notes_padding():
    from lighten.registry import get_step

    step = get_step("prune.nm")
    cfg = step.config_type(n=2, m=4, ignore=["7"], finetune={"epochs": 1, "lr": 1e-2})
    model, ctx = tiny_cnn(), _context()
    head = model[7].weight.detach().clone()
    step.apply(model, cfg, ctx)
    untuned = prune_nm_(tiny_cnn(), NMPruneConfig(n=2, m=4, ignore=["7"]))  # no fine-tuning
    for name, w in prunable_weights(model, ["7"]).items():
        assert (groups_of(w != 0, 4).sum(-1) <= 2).all()
        # the same mask survived fine-tuning, which really moved the surviving weights
        reference = prunable_weights(untuned, ["7"])[name]
        assert torch.equal(w != 0, reference != 0)
        assert not torch.equal(w, reference)
    assert (model[7].weight != 0).all() and not torch.equal(model[7].weight, head)
    assert any("prune.nm: 2:4" in n for n in ctx.notes)
    assert any("0 is not a multiple of 4" in n for n in ctx.notes)


def test_config_errors():
    with pytest.raises(ValueError, match="smaller than m"):
        NMPruneConfig(n=4, m=4)
    with pytest.raises(ValueError):
        NMPruneConfig(n=2, m=4, sparsity=0.5)
