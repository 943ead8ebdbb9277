"""The logit losses beyond Hinton and DKD: logit-standardized KD and DIST, each against values
computed by hand on small tensors, and each as a ``distill`` step method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lighten.distill.losses import (
    Batch,
    LossParams,
    dist_loss,
    dkd_ls_loss,
    get_loss,
    hinton_ls_loss,
    standardize,
)
from lighten.errors import RecipeError

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.5]]
T = [[2.0, 0.5, 0.0], [0.5, 0.0, 3.0]]
Y = [1, 2]


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _zscore(z):
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - 1))  # unbiased, as the paper
    return [(v - mean) / std for v in z]


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_standardize_is_a_row_z_score_and_ignores_shift_and_scale():
    z = torch.tensor(S)
    expected = torch.tensor([_zscore(r) for r in S])
    assert torch.allclose(standardize(z), expected, atol=1e-6)
    assert torch.allclose(standardize(3 * z + 7), standardize(z), atol=1e-5)


def test_hinton_ls_is_hinton_on_z_scored_logits_with_ce_on_the_raw_ones():
    t, alpha = 2.0, 0.9
    kl = sum(_kl(_softmax(_zscore(tz), t), _softmax(_zscore(sz), t))
             for sz, tz in zip(S, T, strict=True)) / 2
    ce = sum(-math.log(_softmax(sz)[y]) for sz, y in zip(S, Y, strict=True)) / 2
    expected = alpha * t * t * kl + (1 - alpha) * ce
    got = hinton_ls_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), temperature=t,
                         alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # the soft part no longer asks the student to match the teacher's logit scale
    scaled = hinton_ls_loss(5 * torch.tensor(T), torch.tensor(T), torch.tensor(Y),
                            temperature=t, alpha=1.0)
    assert float(scaled) == pytest.approx(0.0, abs=1e-6)


def test_dist_is_t2_times_inter_plus_intra_pearson_distance():
    t = 2.0
    s3, t3 = S + [[0.3, 0.8, -0.4]], T + [[1.0, 1.2, -1.0]]  # 3 samples: intra is not +-1
    ps, pt = [_softmax(r, t) for r in s3], [_softmax(r, t) for r in t3]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt, strict=True)) / 3
    cols = [([r[c] for r in ps], [r[c] for r in pt]) for c in range(3)]
    intra = 1 - sum(_pearson(a, b) for a, b in cols) / 3
    got = dist_loss(torch.tensor(s3), torch.tensor(t3), temperature=t, inter=1.0, intra=0.5)
    assert float(got) == pytest.approx(t * t * (inter + 0.5 * intra), rel=1e-5)
    assert float(dist_loss(torch.tensor(t3), torch.tensor(t3), temperature=t)) == \
        pytest.approx(0.0, abs=1e-5)


def _dkd_by_hand(sz, tz, y, t, beta):
    """TCKD + beta NCKD of one sample, times T^2, from the softmax definitions."""
    ps, pt = _softmax(sz, t), _softmax(tz, t)
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    rest_s = _softmax([v for i, v in enumerate(sz) if i != y], t)
    rest_t = _softmax([v for i, v in enumerate(tz) if i != y], t)
    return t * t * (tckd + beta * _kl(rest_t, rest_s))


def test_dkd_ls_is_dkd_on_z_scored_logits():
    t, beta = 0.5, 8.0
    expected = sum(_dkd_by_hand(_zscore(sz), _zscore(tz), y, t, beta)
                   for sz, tz, y in zip(S, T, Y, strict=True)) / 2
    got = dkd_ls_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), temperature=t,
                      beta=beta)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # a student whose logits are the teacher's up to scale and shift is already there
    same = dkd_ls_loss(3 * torch.tensor(T) - 1, torch.tensor(T), torch.tensor(Y), temperature=t)
    assert float(same) == pytest.approx(0.0, abs=1e-5)


def test_registered_as_losses_that_need_a_teacher():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor(Y)
    b = Batch(student=s, labels=y, task_loss=F.cross_entropy, teacher=t)
    p = LossParams(temperature=2.0, alpha=0.8)
    assert float(get_loss("hinton_ls").fn(b, p)) == pytest.approx(
        float(hinton_ls_loss(s, t, y, temperature=2.0, alpha=0.8)), rel=1e-6)
    assert float(get_loss("dist").fn(b, p)) == pytest.approx(
        float(dist_loss(s, t, temperature=2.0)), rel=1e-6)
    b.ramp = 0.5  # dkd_ls ramps in like dkd
    assert float(get_loss("dkd_ls").fn(b, LossParams(temperature=0.5, dkd_beta=8.0))) == \
        pytest.approx(0.5 * float(dkd_ls_loss(s, t, y, temperature=0.5, beta=8.0)), rel=1e-6)
    soft = frozenset({"teacher", "class_logits"})
    assert get_loss("dist").needs == get_loss("hinton_ls").needs == soft
    assert get_loss("dkd_ls").needs == soft


@pytest.mark.parametrize("method", ["hinton_ls", "dist", "dkd_ls"])
def test_distill_step_trains_a_student_with_the_method(method):
    from lighten import compress
    from lighten.data import DataSpec, load_data
    from lighten.training import TrainConfig

    data = load_data(DataSpec(name="digits", limit_train=256, limit_test=64))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = student[1].weight.detach().clone()
    model, report = compress(student, {"distill": {"method": method, "temperature": 3.0,
                                                   "finetune": {"epochs": 1, "lr": 3e-3}}},
                             data=data, baseline=teacher, seed=0,
                             train=TrainConfig(batch_size=32))
    assert report.summary["losses"] == {"hinton_ls": {"hinton_ls": 1.0},
                                        "dist": {"ce": 1.0, "dist": 1.0},
                                        "dkd_ls": {"ce": 1.0, "dkd_ls": 1.0}}[method]
    assert not torch.equal(model[1].weight, before)  # it trained
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_method_names_the_new_ones():
    from lighten import compress
    from lighten.data import DataSpec, load_data

    data = load_data(DataSpec(name="digits", limit_train=64, limit_test=32))
    with pytest.raises(RecipeError, match="hinton_ls"):
        compress(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                 {"distill": {"method": "hinton-ls"}}, data=data)
