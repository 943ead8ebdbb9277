"""Zoo models (shapes, fx tracing), build_model, and safe weight loading with clear errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from lighten.errors import CheckpointError, ModelError
from lighten.models import (
    ZOO,
    ModelSpec,
    build_model,
    example_inputs,
    load_weights,
    shipped_checkpoint,
)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_logits_and_fx_trace(name, shape):
    torch.manual_seed(0)
    model = ZOO[name](num_classes=10, input_shape=shape).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert torch.allclose(traced(x), out, atol=1e-6)
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_zoo_structure_follows_the_papers():
    lenet = ZOO["lenet5"]()
    assert [m.out_features for m in lenet.modules() if isinstance(m, nn.Linear)] == [120, 84, 10]
    assert lenet.classifier[1].in_features == 16 * 5 * 5
    resnet = ZOO["resnet20"]()
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19  # 19 convs + fc = 20 layers
    shortcuts = [m for m in convs if m.kernel_size == (1, 1)]
    assert [s.out_channels for s in shortcuts] == [32, 64]
    mobile = ZOO["mobilenetv2"]()
    depthwise = [m for m in mobile.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert any(isinstance(m, nn.ReLU6) for m in mobile.modules())


def test_num_classes_and_channels():
    model = ZOO["vgg_small"](num_classes=3, input_shape=(3, 8, 8))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_build_model_zoo_and_unknown_name():
    model = build_model(ModelSpec(zoo="lenet300"), input_shape=(1, 8, 8), num_classes=5)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 5)
    with pytest.raises(ModelError, match="unknown zoo model 'lenet7'; known: lenet5, lenet300"):
        build_model(ModelSpec(zoo="lenet7"), input_shape=(1, 28, 28), num_classes=10)


def test_model_spec_validation():
    with pytest.raises(ValidationError, match="exactly one of 'zoo'"):
        ModelSpec()
    with pytest.raises(ValidationError, match="needs model.input_shape"):
        ModelSpec(python="m.py:f")


def test_build_model_from_python(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(
        "from torch import nn\n"
        "def make(width=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(),\n"
        "                         nn.Linear(width, 3))\n"
        "def not_a_model():\n"
        "    return 42\n"
    )
    spec = ModelSpec(python=f"{path}:make", input_shape=[1, 4, 4], kwargs={"width": 6})
    model = build_model(spec, input_shape=(1, 4, 4), num_classes=3)
    assert model[1].out_features == 6
    with pytest.raises(ModelError, match="expected logits \\(2, 10\\)"):
        build_model(spec, input_shape=(1, 4, 4), num_classes=10)
    with pytest.raises(ModelError, match="differs from the data's"):
        build_model(spec, input_shape=(1, 8, 8), num_classes=3)
    bad = ModelSpec(python=f"{path}:not_a_model", input_shape=[1, 4, 4])
    with pytest.raises(ModelError, match="returned int"):
        build_model(bad, input_shape=(1, 4, 4), num_classes=3)


def test_build_model_wrong_input_shape_is_model_error(tmp_path):
    path = tmp_path / "mlp.py"
    path.write_text("from torch import nn\ndef make():\n    return nn.Linear(5, 2)\n")
    spec = ModelSpec(python=f"{path}:make", input_shape=[7])
    with pytest.raises(ModelError, match="cannot run on inputs of shape \\[7\\]"):
        build_model(spec, input_shape=(7,), num_classes=2)


@pytest.fixture
def lenet_and_file(tmp_path):
    torch.manual_seed(1)
    model = ZOO["lenet5"](input_shape=(1, 8, 8))
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_load_weights_roundtrip_safetensors_and_pt(lenet_and_file, tmp_path):
    model, path = lenet_and_file
    fresh = ZOO["lenet5"](input_shape=(1, 8, 8))
    load_weights(fresh, path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": model.state_dict()}, pt)
    other = load_weights(ZOO["lenet5"](input_shape=(1, 8, 8)), pt)
    assert torch.equal(other(x), model(x))


def test_build_model_loads_weights(lenet_and_file):
    model, path = lenet_and_file
    built = build_model(ModelSpec(zoo="lenet5", weights=str(path)), input_shape=(1, 8, 8),
                        num_classes=10)
    assert torch.equal(built.features[0].weight, model.features[0].weight)


def test_truncated_safetensors(lenet_and_file):
    _, path = lenet_and_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load_weights(ZOO["lenet5"](input_shape=(1, 8, 8)), path)


@pytest.mark.parametrize("suffix, message", [(".safetensors", "truncated or corrupt"),
                                             (".pt", "not a torch weights file")])
def test_random_bytes(tmp_path, suffix, message):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(bytes(range(7, 256)) * 8)
    with pytest.raises(CheckpointError, match=message):
        load_weights(ZOO["lenet300"](), path)


class Payload:
    """Unpickling this would write a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"weight": Payload(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match="never unpickles untrusted files"):
        load_weights(ZOO["lenet300"](), path)
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"weight": Payload(str(marker))}, zipped)
    marker.unlink(missing_ok=True)  # torch.save itself does not run it, but be sure
    with pytest.raises(CheckpointError, match="convert it to safetensors"):
        load_weights(ZOO["lenet300"](), zipped)
    assert not marker.exists()


def test_truncated_torch_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(ZOO["lenet300"]().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt torch file"):
        load_weights(ZOO["lenet300"](), path)


def test_shape_mismatch_and_key_errors_name_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(ZOO["lenet300"](num_classes=5).state_dict(), str(path))
    mismatch = r"shape mismatch classifier\.5\.weight \(5, 100\) vs model \(10, 100\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_weights(ZOO["lenet300"](), path)
    with pytest.raises(CheckpointError, match="missing keys features.0.weight"):
        load_weights(ZOO["lenet5"](), path)


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(ZOO["lenet300"](), tmp_path / "none.safetensors")
    odd = tmp_path / "w.npz"
    odd.write_bytes(os.urandom(10))
    with pytest.raises(CheckpointError, match="unknown extension '.npz'"):
        load_weights(ZOO["lenet300"](), odd)


def test_non_tensor_state_is_not_a_weights_file(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a weights file"):
        load_weights(ZOO["lenet300"](), path)


def test_example_inputs():
    model, x = example_inputs("resnet20", batch=2, input_shape=(1, 8, 8))
    assert model(x).shape == (2, 10)
    assert torch.equal(x, example_inputs("resnet20", batch=2, input_shape=(1, 8, 8))[1])


@pytest.mark.parametrize("name, floor", [("lenet5", 0.87), ("lenet300", 0.86),
                                         ("resnet20", 0.90), ("mobilenetv2", 0.88),
                                         ("vgg_small", 0.88)])
def test_shipped_checkpoints_load_and_are_accurate(name, floor):
    """Each shipped file loads strictly and classifies 1000 real test images well."""
    from lighten.data import DataSpec, load_data
    from lighten.data import fashion_mnist as fm
    from lighten.training import evaluate

    assert shipped_checkpoint(name, "no-such-data") is None
    path = shipped_checkpoint(name, "fashion-mnist")
    if path is None:
        pytest.skip(f"{name} checkpoint not trained yet (scripts/train_zoo.py {name})")
    if not Path(fm.DEFAULT_DIR, fm.FILES["test"][0]).is_file():
        pytest.skip("Fashion-MNIST not installed")
    assert path.stat().st_size < 2_000_000
    model = load_weights(ZOO[name](), path)
    data = load_data(DataSpec(name="fashion-mnist", root=fm.DEFAULT_DIR, limit_train=1,
                              limit_test=1000))
    assert evaluate(model, data.test) > floor
