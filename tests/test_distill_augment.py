"""Consistent teaching (``distill: {augment: ...}``): the teacher's logits belong to the very
view the student trains on (cached K views and live), crops / flips / mixes are what they say,
a mixed image's label loss is the mixed cross-entropy, and the step runs it end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lighten import compress
from lighten.data import DataSpec, load_data, make_loader
from lighten.distill.augment import AugmentConfig, AugmentedViews, mixed_cross_entropy
from lighten.distill.models import freeze
from lighten.distill.objective import Objective
from lighten.errors import RecipeError
from lighten.task import ClassificationTask
from lighten.training import TrainConfig, train


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g),
                         torch.randint(0, 3, (n,), generator=g))


def test_views_are_crops_flips_and_mixes_by_hand():
    data = _data()
    x = data.tensors[0]
    views = AugmentedViews(data, AugmentConfig(crop=1, flip=True, views=3))
    p, pad = views.params, F.pad(x, (1, 1, 1, 1), value=float(x.min()))
    for v in range(3):
        out = views.render(v, torch.arange(len(x)))[0]
        for i in range(len(x)):
            oy, ox = int(p.oy[v, i]), int(p.ox[v, i])
            want = pad[i, :, oy:oy + 6, ox:ox + 6]
            assert torch.equal(out[i], want.flip(-1) if p.flip[v, i] else want)
    assert p.flip.any() and not p.flip.all() and (p.oy != 1).any()
    mixed = AugmentedViews(data, AugmentConfig(crop=0, flip=False, mixup=0.4, views=2))
    q = mixed.params
    assert (q.lam >= 0.5).all() and (q.lam <= 1).all() and (q.lam < 0.9).any()
    out = mixed.render(1, torch.arange(len(x)))[0]
    lam = q.lam[1][:, None, None, None]
    assert torch.allclose(out, lam * x + (1 - lam) * x[q.partner[1]], atol=1e-6)


@pytest.mark.parametrize("a", [0.2, 2.0])
def test_gamma_sampler_moments(a):
    """The seeded Gamma(a, 1) behind mixup's Beta(a, a): mean a, variance a."""
    from lighten.distill.augment import _gamma

    g = _gamma(a, (40000,), torch.Generator().manual_seed(0))
    assert g.min() > 0
    assert g.mean().item() == pytest.approx(a, rel=0.05)
    assert g.var().item() == pytest.approx(a, rel=0.1)


def test_mixed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    ya, yb, lam = torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([0.7, 1.0])

    def ce(row, k):
        return -(row[k] - math.log(sum(math.exp(v) for v in row)))

    rows = logits.tolist()
    want = (0.7 * ce(rows[0], 0) + 0.3 * ce(rows[0], 1) + ce(rows[1], 2)) / 2
    assert mixed_cross_entropy(logits, ya, yb, lam).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("views", [3, 0])
def test_teacher_targets_are_the_teacher_on_the_students_view(views):
    """Through the shuffled loader: every batch's teacher logits (cached row or live) equal the
    teacher run on exactly the images the student is given, labels included."""
    torch.manual_seed(0)
    teacher, data = freeze(_net()), _data()
    cfg = AugmentConfig(crop=1, flip=True, mixup=0.3, views=views)
    obj = Objective([_net()], task=ClassificationTask((1, 6, 6), 3), train_set=data,
                    example=(data.tensors[0][:2],), losses={"hinton": 1.0}, teachers=[teacher],
                    augment=cfg)
    assert (obj.cached is not None) == bool(views)
    assert obj.cached is None or obj.cached.shape == (3 * len(data), 3)
    for x, targets in make_loader(obj.dataset, 8, shuffle=True, seed=3):
        ya, row = targets[:, 0].long(), targets[:, 3].long()
        if views:
            assert torch.equal(ya, data.tensors[1][row % len(data)])
        with torch.no_grad():
            live = obj.module(x)["teacher"] if not views else obj.cached[row]
            assert torch.allclose(live, teacher(x), atol=1e-5)
        assert not torch.equal(x, data.tensors[0][:len(x)])  # augmented
    obj.close()


def test_label_only_student_gets_the_same_views_and_learns():
    """``losses: {ce: 1}`` with augment: no teacher, the same (seeded) views, mixed labels."""
    torch.manual_seed(0)
    data = _data(96)
    cfg = AugmentConfig(crop=1, flip=False, mixup=0.2, views=2)
    obj = Objective([_net()], task=ClassificationTask((1, 6, 6), 3), train_set=data,
                    example=(data.tensors[0][:2],), losses={"ce": 1.0}, augment=cfg)
    assert obj.teachers is None and obj.cached is None
    other = AugmentedViews(data, cfg)
    assert all(torch.equal(getattr(obj.dataset.params, k), getattr(other.params, k))
               for k in ("oy", "ox", "flip", "partner", "lam"))
    losses = train(obj.module, obj.dataset, TrainConfig(epochs=4, batch_size=16, lr=1e-2),
                   task=obj.task, progress=False)
    assert losses[-1] < losses[0]


def test_distill_step_with_augment_end_to_end_and_its_errors():
    data = load_data(DataSpec(name="digits", limit_train=300, limit_test=100))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(8 * 64, 10))
    train(teacher, data.train, TrainConfig(epochs=2, lr=3e-3, batch_size=32), progress=False)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cfg = {"distill": {"method": "hinton", "augment": {"crop": 1, "flip": False, "views": 2},
                       "finetune": {"epochs": 1, "lr": 3e-3}}}
    model, report = compress(student, cfg, data=data, baseline=teacher.eval(), seed=0,
                             train=TrainConfig(batch_size=32))
    assert isinstance(model, nn.Sequential)
    assert "consistent teaching: 2 fixed views" in " ".join(report.notes)
    assert 0 < report.summary["teacher_fit"]["train_accuracy"] <= 1  # on the 2 x 300 views
    with pytest.raises(RecipeError, match="augment twice"):
        compress(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), cfg, data=data,
                 baseline=teacher, seed=0, train=TrainConfig(batch_size=32, augment=True))
    with pytest.raises(Exception, match="crop, flip and mixup are all off"):
        compress(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                 {"distill": {"augment": {"crop": 0, "flip": False}}}, data=data,
                 baseline=teacher, seed=0)


def test_relational_reads_the_teachers_cached_embedding_of_the_same_view():
    """With views, RKD needs no live teacher: each row's cached embedding is the teacher's
    classifier input on the view the student trains on."""
    torch.manual_seed(0)
    teacher, data = freeze(_net()), _data()
    obj = Objective([_net()], task=ClassificationTask((1, 6, 6), 3), train_set=data,
                    example=(data.tensors[0][:2],), losses={"hinton": 1.0, "relational": 1.0},
                    teachers=[teacher], augment=AugmentConfig(crop=1, views=2))
    assert not obj.module.live_teacher and obj.cached_embeddings.shape == (2 * len(data), 16)
    x, targets = next(iter(make_loader(obj.dataset, 8, shuffle=True, seed=1)))
    row = targets[:, 3].long()
    with torch.no_grad():
        assert torch.allclose(obj.cached_embeddings[row], teacher[:5](x), atol=1e-5)
    losses = train(obj.module, obj.dataset, TrainConfig(epochs=1, batch_size=8),
                   task=obj.task, progress=False)
    assert math.isfinite(losses[0])
    obj.close()


def test_relational_on_the_fixed_data_caches_the_embedding_by_sample():
    torch.manual_seed(0)
    teacher, data = freeze(_net()), _data()
    obj = Objective([_net()], task=ClassificationTask((1, 6, 6), 3), train_set=data,
                    example=(data.tensors[0][:2],), losses={"hinton": 1.0, "relational": 1.0},
                    teachers=[teacher])
    assert not obj.module.live_teacher and obj.cached_embeddings.shape == (len(data), 16)
    x, targets = next(iter(make_loader(obj.dataset, 8, shuffle=True, seed=1)))
    with torch.no_grad():
        assert torch.allclose(obj.cached_embeddings[targets[:, 1]], teacher[:5](x), atol=1e-5)
    obj.close()
