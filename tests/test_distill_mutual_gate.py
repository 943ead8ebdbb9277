"""Mutual learning started from a trained student: the fresh peer must not drag it down. The
step sees that peer 0 arrives trained and switches to the gated loss; from scratch it keeps the
paper's loss; ``gate:`` overrides, and goes with method mutual only."""

from __future__ import annotations

import copy

import pytest
import torch

from lighten import compress
from lighten.data import DataSpec, load_data
from lighten.errors import RecipeError
from lighten.models import ZOO
from lighten.training import TrainConfig, evaluate, train

TRAIN = TrainConfig(batch_size=64, lr=3e-3)


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))  # 8x8 images, 10 classes


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = ZOO["lenet5"](num_classes=10, input_shape=(1, 8, 8))
    train(model, digits.train, TrainConfig(epochs=10, lr=3e-3, batch_size=64), progress=False)
    return model.eval()


def _mutual(model, digits, **options):
    return compress(copy.deepcopy(model), {"distill": {"method": "mutual", **options,
                                                       "finetune": {"epochs": 1}}},
                    data=digits, seed=0, train=TRAIN)


def test_a_trained_student_gets_the_gated_loss_and_keeps_its_accuracy(digits, trained):
    before = evaluate(trained, digits.test)
    assert before > 0.9
    gated, report = _mutual(trained, digits)
    assert report.summary["losses"] == {"ce": 1.0, "mutual_gated": 1.0}
    assert any("arrives trained" in n for n in report.notes)
    paper, paper_report = _mutual(trained, digits, gate=False)
    assert paper_report.summary["losses"] == {"ce": 1.0, "mutual": 1.0}
    after, dragged = evaluate(gated, digits.test), evaluate(paper, digits.test)
    # measured: 0.947 -> 0.939 gated, 0.867 with the paper's loss (one epoch, random peer 1)
    assert after > before - 0.03 and after > dragged + 0.03


def test_fresh_peers_keep_the_papers_loss(digits):
    torch.manual_seed(1)
    fresh = ZOO["lenet5"](num_classes=10, input_shape=(1, 8, 8))
    _, report = compress(fresh, {"distill": {"method": "mutual", "finetune": {"epochs": 0.2}}},
                         data=digits, seed=0, train=TRAIN)
    assert report.summary["losses"] == {"ce": 1.0, "mutual": 1.0}
    assert not any("arrives trained" in n for n in report.notes)


@pytest.mark.parametrize("options, message", [
    ({"method": "hinton", "gate": True}, "gate goes with method: mutual"),
    ({"method": "mutual", "gate": True, "losses": {"ce": 1, "mutual": 1}},
     "name mutual or mutual_gated yourself"),
])
def test_gate_outside_its_place_is_refused(options, message, digits, trained):
    with pytest.raises(RecipeError, match=message):
        compress(copy.deepcopy(trained), {"distill": options}, data=digits, train=TRAIN)
