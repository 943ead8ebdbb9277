"""Each distillation loss against values computed by hand on small tensors, and the objective's
promises: teachers get no gradient, cached teacher logits equal the live ones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lighten.distill.losses import (
    LOSSES,
    Batch,
    LossParams,
    attention_loss,
    dkd_loss,
    get_loss,
    hint_loss,
    hinton_loss,
    rkd_loss,
)
from lighten.errors import RecipeError


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.5]]
T = [[2.0, 0.5, 0.0], [0.5, 0.0, 3.0]]
Y = [1, 2]


def test_hinton_is_alpha_t2_kl_plus_one_minus_alpha_ce():
    t, alpha = 2.0, 0.7
    kl = sum(_kl(_softmax(tz, t), _softmax(sz, t)) for sz, tz in zip(S, T, strict=True)) / 2
    ce = sum(-math.log(_softmax(sz)[y]) for sz, y in zip(S, Y, strict=True)) / 2
    expected = alpha * t * t * kl + (1 - alpha) * ce
    got = hinton_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), temperature=t,
                      alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_dkd_is_alpha_tckd_plus_beta_nckd():
    t, alpha, beta = 2.0, 1.0, 8.0
    tckd = nckd = 0.0
    for sz, tz, y in zip(S, T, Y, strict=True):
        ps, pt = _softmax(sz, t), _softmax(tz, t)
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rest = [i for i in range(3) if i != y]
        nckd += _kl(_softmax([tz[i] for i in rest], t), _softmax([sz[i] for i in rest], t))
    expected = (alpha * tckd + beta * nckd) * t * t / 2
    got = dkd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), temperature=t,
                   alpha=alpha, beta=beta)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # plain KD = TCKD + (1 - p_T[target]) NCKD (the paper's decomposition), per sample
    one = dkd_loss(torch.tensor(S[:1]), torch.tensor(T[:1]), torch.tensor(Y[:1]),
                   temperature=t, alpha=1.0, beta=1 - _softmax(T[0], t)[Y[0]])
    kd = t * t * _kl(_softmax(T[0], t), _softmax(S[0], t))
    assert float(one) == pytest.approx(kd, rel=1e-5)


def test_hint_is_mse_and_pools_the_larger_map():
    s, t = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    t[0, 0] = 3.0
    assert float(hint_loss(s, t)) == pytest.approx(((3 - 1) ** 2 * 4 + 1 * 4) / 8)
    big = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = F.avg_pool2d(big, 2)
    assert float(hint_loss(big, pooled)) == pytest.approx(0.0)


def test_attention_transfer_by_hand():
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], ])  # (1, 1, 2, 2): all attention on one pixel
    t = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # uniform, 2 ch
    # attention maps: s -> (1, 0, 0, 0); t -> (1/2, 1/2, 1/2, 1/2) after normalization
    expected = ((1 - 0.5) ** 2 + 3 * 0.5 ** 2) / 4
    assert float(attention_loss(s, t)) == pytest.approx(expected)


def test_rkd_distance_and_angle_by_hand():
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(rkd_loss(2 * teacher, teacher)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # collinear
    # distances / mean: teacher (1, 1, sqrt2) / ((2 + sqrt2) / 3); student (1, 2, 1) / (4 / 3)
    td = [1, 1, math.sqrt(2)]
    sd = [1, 2, 1]
    tn = [d / (sum(td) / 3) for d in td]
    sn = [d / (sum(sd) / 3) for d in sd]

    def smooth_l1(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    dist = sum(smooth_l1(a, b) for a, b in zip(sn, tn, strict=True)) * 2 / 9  # (B*B) entries
    got = rkd_loss(student, teacher, distance_weight=1.0, angle_weight=0.0)
    assert float(got) == pytest.approx(dist, rel=1e-5)
    angle = rkd_loss(student, teacher, distance_weight=0.0, angle_weight=1.0)
    assert float(angle) > 0


def test_registered_losses_compose_and_unknown_names_are_refused():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor(Y)
    b = Batch(student=s, labels=y, task_loss=F.cross_entropy, teacher=t,
              exits=[torch.zeros(2, 3)], peers=[t])
    p = LossParams(temperature=2.0, alpha=0.7)
    assert float(get_loss("hinton").fn(b, p)) == pytest.approx(
        float(0.7 * get_loss("kd").fn(b, p) + 0.3 * get_loss("ce").fn(b, p)), rel=1e-6)
    # self: each exit learns the labels and the final head's soft targets
    uniform_ce = math.log(3)
    kd = 4 * sum(_kl(_softmax(z, 2.0), [1 / 3] * 3) for z in S) / 2
    assert float(get_loss("self").fn(b, p)) == pytest.approx(uniform_ce + kd, rel=1e-5)
    # mutual: KL from the peer at T = 1
    mutual = sum(_kl(_softmax(tz), _softmax(sz)) for sz, tz in zip(S, T, strict=True)) / 2
    assert float(get_loss("mutual").fn(b, p)) == pytest.approx(mutual, rel=1e-5)
    assert {"ce", "kd", "hinton", "dkd", "hint", "attention", "relational", "self",
            "mutual"} <= set(LOSSES)
    with pytest.raises(RecipeError, match="did you mean 'hinton'"):
        get_loss("hintn")


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def test_teachers_get_no_gradient_and_cached_logits_equal_live_ones():
    from torch.utils.data import TensorDataset

    from lighten.distill.models import freeze
    from lighten.distill.objective import Objective
    from lighten.task import ClassificationTask

    torch.manual_seed(0)
    teacher, student = freeze(_tiny()), _tiny()
    task = ClassificationTask((1, 8, 8), 3)
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    before = [p.clone() for p in teacher.parameters()]
    x, y = data.tensors
    losses = {}
    for cache in (True, False):
        obj = Objective([student], task=task, train_set=data, example=(x[:2],),
                        losses={"hinton": 1.0, "hint": 1.0} if not cache else {"hinton": 1.0},
                        teachers=[teacher], cache=cache)
        targets = torch.stack([y, torch.arange(16)], 1) if obj.cached is not None else y
        out = obj.module.train()(x)
        loss = obj.task.loss(out, targets)
        loss.backward()
        losses[cache] = float(get_loss("hinton").fn(
            Batch(student=out["students"][0].detach(), labels=y, task_loss=F.cross_entropy,
                  teacher=obj.cached if cache else out["teacher"]), obj.params))
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert any(p.grad is not None for p in student.parameters())
        assert not any(p is q for p in obj.module.parameters() for q in teacher.parameters())
        obj.close()
        student.zero_grad()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert not teacher.training
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())


def test_gated_mutual_teaches_only_where_the_peer_knows_the_label_better():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor(Y)
    b = Batch(student=s, labels=y, task_loss=F.cross_entropy, peers=[t])
    got = float(get_loss("mutual_gated").fn(b, LossParams()))
    expected = 0.0
    for sz, tz, label in zip(S, T, Y, strict=True):
        gate = max(0.0, _softmax(tz)[label] - _softmax(sz)[label])
        expected += gate * _kl(_softmax(tz), _softmax(sz)) / 2
    # sample 0: the peer gives class 1 less than the student does (no pull); sample 1: more
    assert _softmax(T[0])[1] < _softmax(S[0])[1] and _softmax(T[1])[2] > _softmax(S[1])[2]
    assert got == pytest.approx(expected, rel=1e-5) and expected > 0
    # a peer that knows every label worse than the learner teaches nothing, and gets no grad
    weak = torch.zeros(2, 3, requires_grad=True)
    s_grad = s.clone().requires_grad_()
    strong = Batch(student=s_grad + torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]), labels=y,
                   task_loss=F.cross_entropy, peers=[weak])
    loss = get_loss("mutual_gated").fn(strong, LossParams())
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert weak.grad is None or not weak.grad.any()
