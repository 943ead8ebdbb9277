"""Small students of the ResNet-20 teacher (issue #12): ``derive_student`` from Python and the
sweep's student choices (1/4-width ResNet-20, ResNet-8)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lighten.distill.models import derive_student
from lighten.errors import UnsupportedError
from lighten.models import ZOO
from lighten.models.resnet import BasicBlock

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return ZOO["resnet20"]().eval()


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_quarter_width_student_is_a_fresh_trainable_copy_and_leaves_the_base(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(2, 1, 28, 28)
    student, parts = derive_student(teacher, x, width=0.25, seed=3)
    assert {c.out_channels for c in _convs(student)} == {4, 8, 16}
    assert student.fc.in_features == 16 and parts == ["width 0.25 (112/448 channels)"]
    assert student.training and not teacher.training
    assert all(p.requires_grad for p in student.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    # re-initialized, seeded: the same seed gives the same weights, another seed others
    again, _ = derive_student(teacher, x, width=0.25, seed=3)
    other, _ = derive_student(teacher, x, width=0.25, seed=4)
    w = student.stem[0].weight
    assert torch.equal(w, again.stem[0].weight) and not torch.equal(w, other.stem[0].weight)
    assert not torch.equal(w, teacher.stem[0].weight[:4])
    # it learns: a few Adam steps on a fixed batch lower the loss
    y = torch.tensor([1, 7])
    opt = torch.optim.Adam(student.parameters(), 1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(student(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_depth_keeps_that_share_of_the_removable_blocks(teacher):
    x = torch.randn(2, 1, 28, 28)
    student, parts = derive_student(teacher, x, depth=0.5, seed=0, init="keep")
    kept = [m for m in student.modules() if isinstance(m, BasicBlock)]
    # ResNet-20: 9 blocks, 7 removable (all but the two that downsample); half -> 4 removed
    assert parts == ["depth 0.5 (4 blocks removed)"] and len(kept) == 5
    assert student(x).shape == (2, 10)
    with pytest.raises(UnsupportedError, match="rounds to 0"):
        derive_student(teacher, x, depth=0.99)


@pytest.mark.parametrize("name, convs, params", [
    ("resnet8", 9, 77_754), ("resnet20x0.25", 21, 17_462), ("lenet5", 2, 61_706)])
def test_sweep_students(teacher, name, convs, params):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    sweep = importlib.import_module("distill_sweep")
    example = (torch.randn(2, 1, 28, 28),)
    model = sweep._student(name, teacher, example, seed=0)
    assert len(_convs(model)) == convs
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(example[0]).shape == (2, 10)
