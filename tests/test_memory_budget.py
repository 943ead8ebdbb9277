"""--max-memory: training, calibration and evaluation fit the budget (measured peak within
10%) by splitting batches, give the same training result, or are refused up front."""

import json
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.cli.main import main
from lighten.errors import LightenError
from lighten.memory import (
    MemoryBudget,
    MemoryBudgetError,
    PeakMemory,
    memory_budget,
    parse_size,
    rss_bytes,
    training_footprint,
)
from lighten.training import TrainConfig, predict, train

pytestmark = pytest.mark.skipif(rss_bytes() is None, reason="needs /proc/self/statm (Linux)")


def wide_cnn() -> nn.Module:
    """Big activations (64 x 28 x 28 floats = 200 KB per sample per layer), few weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def example(batch: int):
    return (torch.zeros(batch, 1, 28, 28),)


def dataset(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,),
                                                                                 generator=g))


def budget_for(model: nn.Module, samples: int) -> int:
    """A budget with room for training ``samples`` at once beside what is resident now."""
    fp = training_footprint(model, example)
    return int((rss_bytes() + fp.at(samples)) / 0.95)


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("1.5GiB", int(1.5 * 2**30)),
                                        ("512M", 512 * 10**6), ("800 mib", 800 * 2**20),
                                        (4096, 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["two gigs", "2XB", "0MB", "-1GB", ""])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(LightenError, match="2GB"):
        parse_size(text)


def test_footprint_grows_with_the_batch_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(8 * 26 * 26, 10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected_next = torch.rand(1)
    torch.manual_seed(3)
    fp = training_footprint(model, example)
    assert torch.rand(1) == expected_next  # the probe does not consume the random stream
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(v, state[k]), k
    # per sample: at least the 8 x 26 x 26 float activations autograd keeps
    assert fp.per_sample >= 8 * 26 * 26 * 4 * 2
    assert fp.at(64) - fp.at(32) == 32 * fp.per_sample


def test_split_batches_give_the_same_training_result():
    """No BatchNorm: accumulating micro-batch gradients is the same step as one batch."""
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01, optimizer="sgd")
    data = dataset(128)
    whole = wide_cnn()
    train(whole, data, cfg, progress=False)
    split = wide_cnn()
    with memory_budget(budget_for(split, 16)):
        train(split, data, cfg, progress=False)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_measured_peak_stays_within_the_budget():
    model = wide_cnn()
    limit = budget_for(model, 24)  # the recipe's batch of 256 needs ~10x that room
    cfg = TrainConfig(epochs=0.5, batch_size=256, lr=0.01)
    with memory_budget(limit), PeakMemory() as peak:
        train(model, dataset(512), cfg, progress=False)
        predict(model, dataset(512), batch_size=512)
    assert peak.peak_mb * 2**20 <= 1.1 * limit


def test_work_that_cannot_fit_is_refused_before_it_starts():
    model = wide_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    limit = rss_bytes() + 2**20  # 1 MiB of room: not even one sample
    with memory_budget(limit), pytest.raises(MemoryBudgetError, match=r"needs about \d+ MiB"):
        train(model, dataset(64), TrainConfig(epochs=1, batch_size=32), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_budget_fit_is_monotone_in_the_limit():
    model = wide_cnn()
    fp = training_footprint(model, example)
    base = rss_bytes()
    sizes = [MemoryBudget(int((base + fp.at(n)) / 0.95)).fit(fp, 256, "t") for n in (4, 16, 64)]
    assert sizes[0] < sizes[1] < sizes[2] <= 256


TINY = """
import torch.nn as nn

def plain(num_classes=4, input_shape=(1, 8, 8)):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
"""


def _recipe(tmp_path, output: str) -> str:
    (tmp_path / "tiny.py").write_text(TINY)
    path = tmp_path / f"{output}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: budget
        model: {{python: tiny.py:plain, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 256, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / output}
        steps:
          - prune.magnitude: {{sparsity: 0.5, finetune: {{epochs: 1}}}}
    """))
    return str(path)


def test_cli_records_the_peak_of_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    assert main(["run", _recipe(tmp_path, "ok"), "--quiet", "--max-memory", "20GB"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").open()]
    assert [r["stage"] for r in rows] == ["baseline", "prune.magnitude"]
    assert all(0 < r["peak_memory_mib"] < 20e9 / 2**20 for r in rows)


def test_cli_refuses_a_budget_below_what_is_resident(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    assert main(["run", _recipe(tmp_path, "small"), "--quiet", "--max-memory", "10MB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs about" in err[0] and "--max-memory" in err[0]
    assert not (tmp_path / "small" / "metrics.jsonl").exists()
    assert main(["run", _recipe(tmp_path, "bad"), "--max-memory", "lots"]) == 2
    assert "2GB" in capsys.readouterr().err
