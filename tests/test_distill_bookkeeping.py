"""The bookkeeping a distilled student depends on (issue #12's KD diagnosis): cached teacher
logits stay aligned with their samples through the shuffled training loader, the teacher runs
in eval mode while the student trains (its BatchNorm statistics never move), and the soft-target
term is exactly ``T^2 KL(p_T || p_S)`` averaged over the batch ('batchmean', not 'mean')."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lighten.data import make_loader
from lighten.distill.losses import hinton_loss, soft_target_loss
from lighten.distill.models import freeze
from lighten.distill.objective import Objective
from lighten.task import ClassificationTask
from lighten.training import TrainConfig, train


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,),
                                                                             generator=g))


def test_cached_logits_follow_their_samples_through_the_shuffled_loader():
    torch.manual_seed(0)
    teacher, data = freeze(_net()), _data()
    obj = Objective([_net()], task=ClassificationTask((1, 6, 6), 3), train_set=data,
                    example=(data.tensors[0][:2],), losses={"hinton": 1.0}, teachers=[teacher])
    assert obj.cached is not None
    seen = 0
    for x, targets in make_loader(obj.dataset, 8, shuffle=True, seed=3):
        labels, index = targets[:, 0], targets[:, 1]
        assert not torch.equal(index, torch.arange(seen, seen + len(index)))  # really shuffled
        with torch.no_grad():
            assert torch.allclose(obj.cached[index], teacher(x), atol=1e-5)
        assert torch.equal(labels, data.tensors[1][index])
        seen += len(index)
    obj.close()


def test_teacher_stays_in_eval_mode_while_the_student_trains():
    """A live teacher (feature loss, no cache) with BatchNorm: training the student must not
    update the teacher's running statistics nor switch it to batch statistics."""
    torch.manual_seed(0)
    teacher, data = freeze(_net()), _data()
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen_modes = []
    teacher.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    obj = Objective([_net()], task=ClassificationTask((1, 6, 6), 3), train_set=data,
                    example=(data.tensors[0][:2],), losses={"hinton": 1.0, "attention": 1.0},
                    teachers=[teacher], cache=False)
    train(obj.module, obj.dataset, TrainConfig(epochs=1, batch_size=8), task=obj.task,
          progress=False)
    obj.close()
    assert seen_modes and not any(seen_modes)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in stats.items())


def test_soft_targets_are_batchmean_t_squared_kl_by_hand():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.5]])
    temp = 4.0

    def p(row):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = [sum(a * math.log(a / b) for a, b in zip(p(tr), p(sr), strict=True))
          for sr, tr in zip(s.tolist(), t.tolist(), strict=True)]
    expected = temp * temp * sum(kl) / 2  # mean over the 2 samples, not over 6 entries
    assert float(soft_target_loss(s, t, temp)) == pytest.approx(expected, rel=1e-5)
    y = torch.tensor([0, 2])
    ce = float(F.cross_entropy(s, y))
    assert float(hinton_loss(s, t, y, temperature=temp, alpha=0.5)) == pytest.approx(
        0.5 * expected + 0.5 * ce, rel=1e-5)
    # the T^2 factor: the soft-target gradient keeps the scale of the labels' gradient
    a = s.clone().requires_grad_(True)
    soft_target_loss(a, t, temp).backward()
    pa, pt = F.softmax(s / temp, -1), F.softmax(t / temp, -1)
    assert torch.allclose(a.grad, temp * (pa - pt) / 2, atol=1e-6)


def test_teacher_fit_reports_training_accuracy_and_true_class_mass():
    from lighten.distill.objective import teacher_fit

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    fit = teacher_fit(logits, labels, 2.0)
    e = math.exp
    assert fit["train_accuracy"] == pytest.approx(0.5)
    p1 = (e(2) / (e(2) + 2) + e(1) / (1 + e(1) + e(3))) / 2
    p2 = (e(1) / (e(1) + 2) + e(0.5) / (1 + e(0.5) + e(1.5))) / 2
    assert fit["true_class_prob"] == pytest.approx(p1, rel=1e-5)
    assert fit["true_class_prob_at_t"] == pytest.approx(p2, rel=1e-5)
