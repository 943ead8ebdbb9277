"""arch.separable: depthwise + pointwise pairs from a rank-1 fit; shapes, params, MACs, reload."""

import copy

import pytest
import torch
from torch import nn

from lighten import compress
from lighten.arch.separable import SeparableConfig, separable_, separable_pair
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.measure import count_macs
from lighten.models import ZOO


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_a_separable_kernel_is_recovered_exactly():
    """W[o, i] = P[o, i] * D[i] is what the pair computes: the SVD fit finds it (error 0)."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    p, d = torch.randn(10, 6, generator=g), torch.randn(6, 3, 3, generator=g)
    with torch.no_grad():
        conv.weight.copy_(p[:, :, None, None] * d[None])
    pair, error = separable_pair(conv)
    x = torch.randn(4, 6, 9, 9, generator=g)
    with torch.no_grad():
        assert (pair(x) - conv(x)).abs().max() < 1e-5
    assert error < 1e-6
    assert pair[0].groups == 6 and pair[1].kernel_size == (1, 1)


def test_fit_is_the_best_rank1_per_input_channel():
    """Any other per-channel rank-1 factorization fits the kernel worse than the SVD one."""
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 8, 3)
    pair, error = separable_pair(conv)
    w = conv.weight.detach()
    fitted = pair[1].weight.detach()[:, :, 0, 0, None, None] * pair[0].weight.detach()[:, 0]
    assert float((fitted - w).norm() / w.norm()) == pytest.approx(error, rel=1e-4)
    for _ in range(5):  # perturbed factors: never better
        p = pair[1].weight.detach()[:, :, 0, 0] + 0.05 * torch.randn(8, 4, generator=g)
        d = pair[0].weight.detach()[:, 0] + 0.05 * torch.randn(4, 3, 3, generator=g)
        other = p[:, :, None, None] * d[None]
        assert float((other - w).norm() / w.norm()) >= error - 1e-6


def test_refit_on_data_brings_outputs_closer():
    """The sequential least-squares refit of the pointwise weights beats the weight-only fit
    on the model's outputs (inputs it did not see)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 6, 3, padding=1)).eval()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(4, 4, generator=g)  # correlated input channels: the data has structure
    sample = lambda n: torch.einsum("ij,bjhw->bihw", mix,  # noqa: E731
                                    torch.randn(n, 4, 8, 8, generator=g))
    calibration, test = [sample(32) for _ in range(4)], sample(64)
    errors = {}
    for name, batches in (("svd", None), ("refit", calibration)):
        m = copy.deepcopy(model)
        choices = separable_(m, (test[:1],), SeparableConfig(measure_latency=False),
                             batches=batches)
        assert all(c.replaced for c in choices)
        with torch.no_grad():
            errors[name] = float((m(test) - model(test)).norm() / model(test).norm())
        if batches is not None:
            assert all(c.output_error is not None and c.output_error < 1 for c in choices)
    assert errors["refit"] < 0.9 * errors["svd"]


def test_resnet20_three_times_fewer_params_and_reloads(tmp_path):
    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 28, 28)).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 1, 28, 28)
    choices = separable_(model, (x[:1],), SeparableConfig(measure_latency=False))
    convs3 = [n for n, m in reference.named_modules()
              if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels >= 4]
    assert sorted(c.name for c in choices if c.replaced) == sorted(convs3)
    stem = next(c for c in choices if c.name == "stem.0")
    assert not stem.replaced and "input channel" in stem.reason
    before = sum(_params(reference.get_submodule(n)) for n in convs3)
    after = sum(_params(model.get_submodule(n)) for n in convs3)
    assert before >= 3 * after
    assert _params(reference) >= 3 * _params(model)
    assert count_macs(model, (1, 28, 28)) * 3 < count_macs(reference, (1, 28, 28))
    assert all(c.macs_after < c.macs_before for c in choices)
    with torch.no_grad():
        assert model(x).shape == reference(x).shape == (3, 10)
    path = tmp_path / "sep.safetensors"
    save_artifact(model, path, model_spec={"zoo": "resnet20"}, input_shape=[1, 28, 28],
                  num_classes=10)
    loaded, _ = load_artifact(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    check = export_onnx(loaded, tmp_path / "m.onnx", input_shape=(1, 28, 28), sample_inputs=x)
    assert check.max_abs_diff < 1e-4


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.p = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(self.p(x).mean((2, 3)))


def test_compress_times_layers_on_ort_and_fine_tunes_with_distill():
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8],
                              num_classes=4))
    model = Tiny().eval()
    out, report = compress(model, {"arch.separable": {
        "layers": ["c2"], "finetune": {"epochs": 0.5, "distill": 0.5}}}, data=data)
    row = next(r for r in report.layers if r["module"] == "c2")
    assert row["latency_ms_before"] > 0 and row["latency_ms_after"] > 0  # measured on ORT
    assert row["action"] == "separable"  # a listed layer is replaced whatever its time
    assert row["params"] < row["params_before"] and row["macs"] < row["macs_before"]
    assert isinstance(out.c2, nn.Sequential) and isinstance(model.c2, nn.Conv2d)
    assert report.summary["macs_after"] < report.summary["macs_before"]
    assert not torch.equal(out.c2[1].weight, separable_pair(model.c2)[0][1].weight)  # tuned


def test_bad_layer_names_are_one_clear_error():
    model = Tiny()
    with pytest.raises(UnsupportedError, match="1x1 kernel"):
        separable_(model, (torch.zeros(1, 1, 8, 8),),
                   SeparableConfig(layers=["p"], measure_latency=False))
    with pytest.raises(UnsupportedError, match="no module named 'c9'"):
        separable_(model, (torch.zeros(1, 1, 8, 8),),
                   SeparableConfig(layers=["c9"], measure_latency=False))


def _slow_sequential_refit(model, batches):
    """The first version's refit, as the reference: per layer, the inputs it receives now and
    in the original model, each from a full forward pass over the calibration batches."""
    from lighten.arch.separable import refit_pointwise
    from lighten.modules import set_submodule

    def inputs_of(m, name):
        seen = []
        h = m.get_submodule(name).register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
        with torch.no_grad():
            for b in batches:
                m(b)
        h.remove()
        return torch.cat(seen)

    original = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (3, 3) and m.in_channels >= 4]
    for n in names:
        conv = model.get_submodule(n)
        pair, _ = separable_pair(conv)
        refit_pointwise(conv, pair, inputs_of(model, n), target_input=inputs_of(original, n))
        set_submodule(model, n, pair)
    return model


def test_two_pass_refit_equals_the_per_layer_reference():
    """refit_sequential (two forward passes) fits the same pointwise weights as re-running the
    model for every layer, and leaves BatchNorm statistics and the training mode as they were."""
    torch.manual_seed(0)
    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 12, 12))
    with torch.no_grad():  # trained-like BN statistics, so eval mode is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    batches = [torch.randn(8, 1, 12, 12) for _ in range(3)]
    reference = _slow_sequential_refit(copy.deepcopy(model), batches)
    fast = copy.deepcopy(model).train()
    stats = {k: v.clone() for k, v in fast.state_dict().items() if "running" in k}
    choices = separable_(fast, (batches[0][:1],), SeparableConfig(measure_latency=False),
                         batches=batches)
    assert fast.training
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in stats.items())
    replaced = [c.name for c in choices if c.replaced]
    assert len(replaced) == 18 and all(c.output_error is not None for c in choices
                                       if c.replaced)
    for n in replaced:  # equal up to float32 noise (one batch of 24 vs three of 8)
        a, b = (m.get_submodule(n)[1].weight.detach() for m in (fast, reference))
        assert float((a - b).norm() / b.norm()) < 1e-4, n
    x = torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), reference(x), rtol=1e-4, atol=1e-5)


def test_target_params_replaces_the_fewest_layers_that_reach_it():
    """target_params 1/3 on ResNet-20: the model ends under a third of its parameters with the
    largest savings taken first; undoing any one replacement would miss the target, and the
    early 16-channel convs (cheap in parameters) keep their full kernels."""
    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 28, 28)).eval()
    total = _params(model)
    choices = separable_(model, (torch.zeros(1, 1, 28, 28),),
                         SeparableConfig(measure_latency=False, target_params=1 / 3))
    done = [c for c in choices if c.replaced]
    assert 0 < len(done) < 18
    assert _params(model) <= total / 3
    smallest = min(c.params_before - c.params_after for c in done)
    assert _params(model) + smallest > total / 3  # no replaced layer is spare
    kept = [c for c in choices if not c.replaced and c.name != "stem.0"]
    assert kept and all("target_params" in c.reason for c in kept)
    assert max(c.params_before - c.params_after for c in kept) <= smallest
    assert all(isinstance(model.get_submodule(c.name), nn.Conv2d) for c in kept)


def test_target_params_out_of_range_is_one_clear_error():
    from lighten.errors import RecipeError

    data = load_data(DataSpec(name="synthetic", samples=16, input_shape=[1, 8, 8],
                              num_classes=4))
    with pytest.raises((RecipeError, ValueError), match="target_params"):
        compress(Tiny().eval(), {"arch.separable": {"target_params": 3}}, data=data)
