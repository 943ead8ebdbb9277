"""Distillation on a task whose outputs are not class logits (a regression): soft-target losses
are refused with the losses that do apply, and those train a smaller student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lighten import compress
from lighten.data import bundle_from_datasets
from lighten.distill.objective import teacher_fit
from lighten.errors import RecipeError
from lighten.task import InputSpec, Task


class Regression(Task):
    kind = "regression"
    primary = "neg_mse"

    def __init__(self):
        self.inputs = (InputSpec("input", (6,)),)

    def loss(self, outputs, targets, *, label_smoothing=0.0):
        return F.mse_loss(outputs.squeeze(-1), targets)

    def metrics(self, outputs, targets):
        return {"neg_mse": -F.mse_loss(outputs.squeeze(-1), targets).item()}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = x[:, 0] * 2 - x[:, 1] + 0.1 * torch.randn(256, generator=g)
    return bundle_from_datasets(TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:]),
                                name="reg", task=Regression())


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 1))


@pytest.mark.parametrize("method", ["hinton", "dkd", "mutual", "hint"])
def test_soft_target_methods_are_refused_naming_the_losses_that_apply(method):
    with pytest.raises(RecipeError, match=r"not class logits.*losses: \{ce: 1, hint: 1\}"):
        compress(_model(), {"distill": {"method": method, "finetune": {"epochs": 1}}},
                 data=_data())


def test_a_relational_loss_trains_a_half_width_regression_student():
    model, report = compress(_model(), {"distill": {
        "losses": {"ce": 1, "relational": 1}, "student": {"width": 0.5},
        "finetune": {"epochs": 2}}}, data=_data())
    assert report.summary["params_after"] < report.summary["params_before"] / 2
    assert model(torch.randn(3, 6)).shape == (3, 1)
    assert "teacher_fit" not in report.summary  # no class probabilities to speak of


def test_teacher_fit_needs_class_logits_against_class_ids():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    fit = teacher_fit(logits, torch.tensor([0, 0]), 1.0)
    assert fit["train_accuracy"] == 0.5
    assert teacher_fit(torch.randn(4, 1), torch.randn(4), 1.0) is None


def test_an_untrained_teacher_is_warned_about():
    from torch.utils.data import TensorDataset

    from lighten.data import bundle_from_datasets

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes a model can learn
    data = bundle_from_datasets(TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:]))
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        teacher[2].weight.zero_()
        teacher[2].bias.copy_(torch.tensor([5.0, 0, 0, 0]))  # always class 0: chance level
    _, report = compress(_model_4(), {"distill": {"finetune": {"epochs": 1}}}, data=data,
                         baseline=teacher)
    assert any(n.startswith("warning: the teacher is near chance") for n in report.notes)


def _model_4():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
