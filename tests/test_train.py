"""The shared training loop: determinism, hooks, fractional epochs, evaluation, augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lighten.data import DataSpec, load_data
from lighten.errors import DataError, LightenError
from lighten.models import ZOO
from lighten.training import Callback, TrainConfig, augment_batch, evaluate, predict, train


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec(name="synthetic", samples=256, input_shape=[1, 8, 8]))


def _model(seed=0, name="lenet300"):
    torch.manual_seed(seed)
    return ZOO[name](input_shape=(1, 8, 8))


def test_training_learns_synthetic_data(data):
    model = _model()
    before = evaluate(model, data.test)
    losses = train(model, data.train, TrainConfig(epochs=4, lr=3e-3, batch_size=32),
                   progress=False)
    assert len(losses) == 4 and losses[-1] < 0.3 * losses[0]
    assert evaluate(model, data.test) > max(0.9, before + 0.3)


def test_same_seed_gives_identical_weights(data):
    cfg = TrainConfig(epochs=1.5, batch_size=32, optimizer="sgd", lr=0.05, augment=True)
    a, b, c = _model(name="lenet5"), _model(name="lenet5"), _model(name="lenet5")
    train(a, data.train, cfg, progress=False)
    train(b, data.train, cfg, progress=False)
    train(c, data.train, cfg.model_copy(update={"seed": 1}), progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.classifier[-1].weight, c.classifier[-1].weight)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, model, optimizer, total_steps):
        self.events.append(("begin", total_steps, isinstance(optimizer, torch.optim.Adam)))

    def on_step_end(self, model, step, total_steps):
        self.events.append(("step", step, total_steps))

    def on_epoch_end(self, model, epoch):
        self.events.append(("epoch", epoch))

    def on_train_end(self, model):
        self.events.append(("end",))


def test_callbacks_and_fractional_epochs(data):
    rec = Recorder()
    losses = train(_model(), data.train, TrainConfig(epochs=1.5, batch_size=64),
                   callbacks=[rec], progress=False)  # 4 batches/epoch -> 6 steps
    assert len(losses) == 2
    assert rec.events[0] == ("begin", 6, True)
    assert [e[1] for e in rec.events if e[0] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [e for e in rec.events if e[0] == "epoch"] == [("epoch", 0), ("epoch", 1)]
    assert rec.events[-1] == ("end",) and rec.events[5] == ("epoch", 0)


def test_loss_term_is_called_and_changes_training(data):
    calls = []

    def l2(model, inputs, outputs, targets):
        calls.append((inputs.shape, outputs.shape, targets.shape))
        return 0.5 * sum((p ** 2).sum() for p in model.parameters())

    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-2)
    plain, penalized = _model(), _model()
    plain_losses = train(plain, data.train, cfg, progress=False)
    pen_losses = train(penalized, data.train, cfg, loss_terms=[l2], progress=False)
    assert len(calls) == 4
    assert calls[0] == (torch.Size([64, 1, 8, 8]), torch.Size([64, 10]), torch.Size([64]))
    assert pen_losses[0] > plain_losses[0] + 1.0  # the term is part of the reported loss

    def norm(m):
        return sum((p ** 2).sum() for p in m.parameters()).item()

    assert norm(penalized) < 0.9 * norm(plain)


def test_diverging_loss_raises(data):
    def poison(model, inputs, outputs, targets):
        return torch.tensor(float("nan"))

    with pytest.raises(LightenError, match="became nan at step 1; lower the learning rate"):
        train(_model(), data.train, TrainConfig(epochs=1), loss_terms=[poison], progress=False)


def test_zero_epochs_changes_nothing(data):
    model = _model()
    before = [p.clone() for p in model.parameters()]
    assert train(model, data.train, TrainConfig(epochs=0), progress=False) == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_modes_are_restored(data):
    model = _model(name="lenet5")
    model.eval()
    train(model, data.train, TrainConfig(epochs=0.25, batch_size=64), progress=False)
    assert not model.training
    model.train()
    evaluate(model, data.test)
    assert model.training


def test_predict_and_evaluate_agree(data):
    model = _model()
    logits = predict(model, data.test, batch_size=7)
    assert logits.shape == (len(data.test), 10)
    labels = data.test.tensors[1]
    expected = (logits.argmax(1) == labels).float().mean().item()
    assert evaluate(model, data.test, batch_size=5) == pytest.approx(expected)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(logits[:3], model(data.test.tensors[0][:3]), atol=1e-6)


def test_augment_is_a_seeded_shift_or_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    a = augment_batch(x, generator=torch.Generator().manual_seed(3), pad=1)
    b = augment_batch(x, generator=torch.Generator().manual_seed(3), pad=1)
    assert a.shape == x.shape and torch.equal(a, b)
    for i in range(2):  # each output is x[i] shifted by <= 1 pixel, maybe mirrored
        candidates = []
        padded = nn.functional.pad(x[i], (1, 1, 1, 1), value=float(x.min()))
        for dy in range(3):
            for dx in range(3):
                crop = padded[:, dy:dy + 6, dx:dx + 6]
                candidates += [crop, crop.flip(-1)]
        assert any(torch.equal(a[i], c) for c in candidates)
    with pytest.raises(DataError, match="augment needs image batches"):
        augment_batch(torch.zeros(4, 10), generator=torch.Generator())


def test_empty_dataset_is_a_data_error():
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="training set is empty"):
        train(_model(), empty, TrainConfig(epochs=1), progress=False)


def test_train_zoo_script_writes_weights_and_sidecar(tmp_path):
    """scripts/train_zoo.py end to end on 256 real images: loadable weights + honest sidecar."""
    import importlib.util
    import json
    from pathlib import Path

    from lighten.data import fashion_mnist as fm
    from lighten.models import load_weights

    if not Path(fm.DEFAULT_DIR, fm.FILES["test"][0]).is_file():
        pytest.skip("Fashion-MNIST not installed")
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_zoo.py"
    spec = importlib.util.spec_from_file_location("train_zoo", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["lenet300", "--epochs", "1", "--limit-train", "256", "--out-dir", str(tmp_path)]
    assert module.main(argv) == 0
    side = json.loads((tmp_path / "lenet300-fashion-mnist.json").read_text())
    assert side["epochs"] == 1 and side["seed"] == 0 and side["limit_train"] == 256
    assert side["command"] == "python scripts/train_zoo.py " + " ".join(argv)
    assert 0.3 < side["test_accuracy"] < 1.0  # 2 steps of Adam on 256 images: better than chance
    weights = tmp_path / "lenet300-fashion-mnist.safetensors"
    assert side["bytes"] == weights.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lenet300-fashion-mnist.json", "lenet300-fashion-mnist.safetensors"]  # no temp files
    load_weights(ZOO["lenet300"](), weights)
