"""Soft-target distillation: the loss formula and the ``finetune: {distill: w}`` option."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lighten.data import DataSpec, load_data
from lighten.distill import soft_target_loss
from lighten.errors import ModelError
from lighten.models import ZOO
from lighten.step import FinetuneConfig, StepContext
from lighten.training import TrainConfig, predict


def test_soft_target_loss_is_t_squared_kl_and_zero_for_equal_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    p = F.softmax(t / 2, -1)
    expected = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(soft_target_loss(s, t, 2.0), expected, atol=1e-6)
    assert float(soft_target_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ModelError, match="same classes"):
        soft_target_loss(s, torch.randn(5, 3), 2.0)


def test_finetune_with_distill_pulls_the_student_towards_the_teacher():
    data = load_data(DataSpec(name="synthetic", samples=256, input_shape=[1, 8, 8]))
    torch.manual_seed(0)
    teacher = ZOO["lenet300"](input_shape=(1, 8, 8))
    student = ZOO["lenet300"](input_shape=(1, 8, 8))
    ctx = StepContext(data=data, train_config=TrainConfig(lr=3e-3, batch_size=32),
                      baseline=teacher, workdir=".", progress=False)
    plain, distilled = copy.deepcopy(student), copy.deepcopy(student)
    ctx.finetune(plain, FinetuneConfig(epochs=2, lr=3e-3))
    ctx.finetune(distilled, FinetuneConfig(epochs=2, lr=3e-3, distill=5.0, temperature=2.0))

    def gap(model):
        return float(soft_target_loss(predict(model, data.test), predict(teacher, data.test), 2))

    assert gap(distilled) < 0.5 * gap(plain)
    assert all(p.requires_grad for p in teacher.parameters()), "the baseline itself stays trainable"
