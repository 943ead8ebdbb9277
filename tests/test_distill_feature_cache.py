"""Feature distillation on fixed data: the teacher's matched feature maps are cached once
(bfloat16) and looked up per sample, so hint / attention training no longer runs the teacher
every step; the loss is the live one within bfloat16 rounding. Attention transfer reads the
student's own maps (no adapter); hint keeps its learned adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.data import make_loader
from lighten.distill import objective as objective_module
from lighten.distill.losses import attention_loss
from lighten.distill.models import freeze
from lighten.distill.objective import Objective
from lighten.task import ClassificationTask


def _net(width: int):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 3))


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g),
                         torch.randint(0, 3, (n,), generator=g))


def _objective(losses, *, cache=True, seed=0):
    torch.manual_seed(seed)
    teacher, data = freeze(_net(8).eval()), _data()
    torch.manual_seed(seed + 1)
    student = _net(4)
    obj = Objective([student], task=ClassificationTask((1, 6, 6), 3), train_set=data,
                    example=(data.tensors[0][:2],), losses=losses, teachers=[teacher],
                    cache=cache)
    return obj, teacher, data


def test_teacher_feature_maps_are_cached_per_sample_in_bfloat16():
    obj, teacher, data = _objective({"hinton": 1.0, "attention": 1000.0})
    assert not obj.module.live_teacher and obj.cached is not None
    assert set(obj.cached_features) == {"2", "3"}  # the 6x6 and 2x2 stage ends
    maps = obj.cached_features["2"]
    assert maps.dtype == torch.bfloat16 and maps.shape == (len(data), 8, 6, 6)
    with torch.no_grad():
        live = teacher[:3](data.tensors[0])
    torch.testing.assert_close(maps.float(), live, rtol=8e-3, atol=1e-6)
    assert obj.feature_cache_bytes == len(data) * (8 * 36 + 8 * 4) * 2
    obj.close()


@pytest.mark.parametrize("losses", [{"hinton": 1.0, "attention": 1000.0},
                                    {"hinton": 1.0, "hint": 1.0}])
def test_cached_feature_loss_equals_the_live_teachers(losses):
    cached, _, data = _objective(losses, cache=True)
    live, _, _ = _objective(losses, cache=False)
    assert live.module.live_teacher and not live.cached_features
    live.module.extras.load_state_dict(cached.module.extras.state_dict())
    x, targets = next(iter(make_loader(cached.dataset, 16, shuffle=True, seed=1)))
    labels, index = targets[:, 0], targets[:, 1]
    assert torch.equal(data.tensors[0][index], x)
    cached.module.eval(), live.module.eval()
    with torch.no_grad():
        a = cached.loss(cached.module(x), targets)
        b = live.loss(live.module(x), labels)
    assert float(a) == pytest.approx(float(b), rel=1e-2)
    cached.close(), live.close()


def test_attention_reads_the_students_own_maps_and_hint_its_adapted_ones():
    attention, _, _ = _objective({"hinton": 1.0, "attention": 1000.0})
    assert len(attention.module.extras) == 0  # no adapter to train, none to drop
    assert [key for *_, key in attention.students[0].pairs] == [None, None]
    hint, _, _ = _objective({"hinton": 1.0, "hint": 1.0})
    assert len(hint.module.extras) == 2
    assert isinstance(hint.module.extras["adapter0_0"][0], nn.Conv2d)  # 4 -> 8 channels
    # the attention term of a batch is the maps' own, computed by hand
    x, targets = next(iter(make_loader(attention.dataset, 8, shuffle=False)))
    student = attention.students[0].model
    with torch.no_grad():
        s_map = student[:3](x)
        t_map = attention.cached_features["2"][:8].float()
        s_pool, t_pool = student[:4](x), attention.cached_features["3"][:8].float()
        expected = (attention_loss(s_map, t_map) + attention_loss(s_pool, t_pool)) / 2
        only = Objective([student], task=attention.base_task, train_set=attention.dataset.base,
                         example=(x[:2],), losses={"attention": 1.0},
                         teachers=attention.teachers.models)
        got = only.loss(only.module(x), targets)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    for obj in (attention, hint, only):
        obj.close()


def test_feature_maps_over_the_cache_limit_leave_the_teacher_live(monkeypatch):
    monkeypatch.setattr(objective_module, "FEATURE_CACHE_BYTES", 1000)
    obj, _, _ = _objective({"hinton": 1.0, "attention": 1000.0})
    assert obj.module.live_teacher and obj.cached is None and not obj.cached_features
    assert obj.feature_cache_refused  # the step notes why the teacher runs every step
    obj.close()
    unasked, _, _ = _objective({"hinton": 1.0, "attention": 1000.0}, cache=False)
    assert unasked.module.live_teacher and not unasked.feature_cache_refused
    unasked.close()
