"""prune.channels ratios: auto -- each group's sensitivity measured alone, budget spent where
accuracy survives it."""

import textwrap

import pytest
import torch
from torch import nn

from lighten.errors import UnsupportedError
from lighten.measure import count_macs
from lighten.prune.channel_sensitivity import ChannelSensitivity, derive_group_ratios
from lighten.prune.structured import ChannelPruneConfig, prune_channels_


def _table(accuracy: list[list[float]]) -> ChannelSensitivity:
    return ChannelSensitivity(baseline=0.9, labels=[f"g{i}" for i in range(len(accuracy))],
                              sizes=[8] * len(accuracy), ratios=(0.3, 0.5, 0.7, 0.9),
                              accuracy=accuracy, samples=100, seconds=0.0)


def test_budget_goes_to_the_group_that_tolerates_it():
    table = _table([[0.90, 0.90, 0.89, 0.88],    # robust
                    [0.80, 0.50, 0.20, 0.10]])   # fragile
    ratios = derive_group_ratios(table, lambda r: sum(r) / 2 >= 0.45)
    assert sum(ratios) / 2 >= 0.45
    robust, fragile = ratios
    assert robust > 0.8 and fragile < 0.1
    assert sum(derive_group_ratios(table, lambda r: sum(r) / 2 >= 0.44)) <= sum(ratios) + 1e-6


def test_noisy_curves_are_made_monotone_and_unreachable_budgets_refused():
    table = _table([[0.85, 0.91, 0.80, 0.70]])  # ratio 0.5 scores above ratio 0.3: noise
    assert table.drop_curve(0) == [(0.0, 0.0), (0.3, pytest.approx(0.05)),
                                   (0.5, pytest.approx(0.05)), (0.7, pytest.approx(0.1)),
                                   (0.9, pytest.approx(0.2))]
    with pytest.raises(UnsupportedError, match="out of reach"):
        derive_group_ratios(table, lambda r: r[0] >= 0.95)


class TwoBranch(nn.Module):
    """Two parallel convs concatenated: the head reads ``a`` and barely looks at ``b``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(1, 16, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1).flatten(2).amax(2))


def _two_branch() -> TwoBranch:
    torch.manual_seed(0)
    model = TwoBranch().eval()
    with torch.no_grad():
        model.head.weight[:, 16:] *= 0.02
    return model


def _labelled_by_model(model, n=512, seed=0):
    """Inputs labelled by the model itself, its bias shifted so every class occurs."""
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.head.bias -= model(x).mean(0)
        return x, model(x).argmax(1)


def _agreement(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_auto_ratios_meet_the_mac_target_and_spare_the_sensitive_branch():
    model = _two_branch()
    x, y = _labelled_by_model(model)
    before = count_macs(model, (1, 8, 8))
    report = prune_channels_(model, ChannelPruneConfig(target_macs=0.6, ratios="auto"), x[:1],
                             eval_batches=lambda: [(x[:256], y[:256])])
    assert count_macs(model, (1, 8, 8)) <= 0.6 * before
    assert model.a.out_channels > model.b.out_channels
    assert report.sensitivity is not None and len(report.sensitivity.labels) == 2
    assert "ratios auto" in " ".join(report.notes)


def test_auto_beats_a_uniform_ratio_at_the_same_budget():
    model = _two_branch()
    x, y = _labelled_by_model(model)
    assert torch.bincount(y, minlength=4).min() > 0
    results = {}
    for ratios in (None, "auto"):
        pruned = TwoBranch().eval()
        pruned.load_state_dict(model.state_dict())
        prune_channels_(pruned, ChannelPruneConfig(target_macs=0.6, ratios=ratios), x[:1],
                        eval_batches=lambda: [(x[:256], y[:256])])
        results[ratios] = _agreement(pruned, x[256:], y[256:])  # held-out samples
    assert results["auto"] > results[None] + 0.15, results  # measured: 0.54 vs 0.24


def test_auto_needs_labelled_data_and_a_budget():
    model = TwoBranch().eval()
    with pytest.raises(UnsupportedError, match="labelled data"):
        prune_channels_(model, ChannelPruneConfig(target_macs=0.5, ratios="auto"),
                        torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="ratios: auto"):
        ChannelPruneConfig(ratio=0.5, ratios="auto")
    with pytest.raises(ValueError, match="ratios: auto"):
        ChannelPruneConfig(target_macs=0.5, ratios="auto", global_ranking=True)


def test_auto_ratios_run_from_a_recipe(tmp_path):
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    (tmp_path / "models.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    '''))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: auto
        model: {{python: models.py:build, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 256, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / "out"}
        steps:
          - prune.channels: {{target_macs: 0.5, ratios: auto, auto_samples: 128}}
    """))
    base, final = run_recipe(load_recipe(recipe), progress=False).rows
    assert final["macs"] <= 0.5 * base["macs"]


def test_cli_structured_sensitivity_writes_one_row_per_group(tmp_path, capsys):
    from lighten.cli.main import main

    out = tmp_path / "an"
    rc = main(["analyze", "resnet20", "--sensitivity", "--structured", "--data", "synthetic",
               "--limit", "16", "--ratios", "0.5,0.9", "--output", str(out)])
    assert rc == 0
    assert "| group | channels | 0.5 | 0.9 |" in capsys.readouterr().out
    rows = (out / "channel_sensitivity.csv").read_text().splitlines()[1:]
    groups = {row.split(",")[0] for row in rows}
    assert len(rows) == 2 * len(groups) and len(groups) == 12  # 3 stage widths + 9 inner convs
    assert (out / "channel_sensitivity.png").stat().st_size > 1000
    assert main(["analyze", "resnet20", "--sensitivity", "--structured", "--data", "synthetic",
                 "--target-sparsity", "0.5", "--output", str(out)]) == 2
    assert "ratios: auto" in capsys.readouterr().err


def test_rounded_widths_are_given_back_where_accuracy_returns():
    results = {}
    for ratios in (None, "auto"):
        model = _two_branch()
        x, y = _labelled_by_model(model)
        before = count_macs(model, (1, 8, 8))
        prune_channels_(model, ChannelPruneConfig(target_macs=0.65, ratios=ratios, round_to=4),
                        x[:1], eval_batches=lambda x=x, y=y: [(x[:256], y[:256])])
        assert count_macs(model, (1, 8, 8)) <= 0.65 * before
        assert model.a.out_channels % 4 == 0 and model.b.out_channels % 4 == 0
        results[ratios] = (model.a.out_channels, model.b.out_channels,
                           _agreement(model, x[256:], y[256:]))
    assert results["auto"][0] > results["auto"][1]  # the branch the head reads stays wider
    assert results["auto"][2] > results[None][2] + 0.3, results  # measured: 0.92 vs 0.25


def test_named_ratios_prune_each_group_by_its_own_fraction_in_iterative_steps():
    from lighten.models import ZOO

    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 8, 8)).eval()
    x = torch.randn(2, 1, 8, 8)
    config = ChannelPruneConfig(ratios={"layers.0.conv1": 0.5, "layers.6.conv1": 0.75},
                                ratio=0.25, iterative_steps=2)
    prune_channels_(model, config, x)
    assert model.layers[0].conv1.out_channels == 8       # 16 * (1 - 0.5)
    assert model.layers[6].conv1.out_channels == 16      # 64 * (1 - 0.75)
    assert model.layers[1].conv1.out_channels == 12      # the default ratio
    assert model(x).shape == (2, 10)


def test_named_ratios_refuse_unknown_modules_and_split_residual_stages():
    from lighten.models import ZOO

    model = ZOO["resnet20"](num_classes=10, input_shape=(1, 8, 8)).eval()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(UnsupportedError, match="'layers.0.conv9' produces no prunable"):
        prune_channels_(model, ChannelPruneConfig(ratios={"layers.0.conv9": 0.5}), x)
    with pytest.raises(UnsupportedError, match="share their channels"):  # one residual stage
        prune_channels_(model, ChannelPruneConfig(
            ratios={"layers.0.conv2": 0.5, "layers.1.conv2": 0.25}), x)
    with pytest.raises(ValueError, match="fixes every group"):
        ChannelPruneConfig(ratios={"layers.0.conv1": 0.5}, target_macs=0.5)


def test_flat_curves_do_not_push_every_group_to_the_end_of_its_plateau():
    flat = [0.90, 0.90, 0.80, 0.70]  # no drop up to half the channels: accuracy moves in steps
    table = _table([flat, flat, flat])
    ratios = derive_group_ratios(table, lambda r: sum(r) / 3 >= 0.1)
    assert sum(ratios) / 3 == pytest.approx(0.1, abs=1e-3)  # was 0.5 each


def test_a_mild_mac_target_is_not_overshot():
    model = _two_branch()
    x, y = _labelled_by_model(model)
    before = count_macs(model, (1, 8, 8))
    prune_channels_(model, ChannelPruneConfig(target_macs=0.9, ratios="auto"), x[:1],
                    eval_batches=lambda: [(x[:256], y[:256])])
    assert 0.8 * before <= count_macs(model, (1, 8, 8)) <= 0.9 * before
