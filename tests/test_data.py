"""Data loaders: built-ins, Fashion-MNIST IDX parsing and its errors, user python: loaders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import TensorDataset

from lighten.data import DataSpec, bundle_from_datasets, load_data, make_loader
from lighten.data import fashion_mnist as fm
from lighten.errors import DataError


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path) -> Path:
    """A valid four-file IDX set: 20 train and 10 test images, pixel value = label * 25."""
    for split, n in (("train", 20), ("test", 10)):
        labels = np.arange(n) % 10
        images = np.repeat(labels * 25, 28 * 28).reshape(n, 28, 28)
        images_file, labels_file = fm.FILES[split]
        _write_idx(tmp_path / images_file, images, 2051)
        _write_idx(tmp_path / labels_file, labels, 2049)
    return tmp_path


def test_synthetic_is_deterministic_and_shaped():
    spec = DataSpec(name="synthetic", samples=64, input_shape=[3, 8, 8], num_classes=4)
    a, b = load_data(spec), load_data(spec)
    assert a.input_shape == (3, 8, 8) and a.num_classes == 4
    assert len(a.train) == 64 and len(a.test) == 16
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    x, y = a.train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 8, 8)


def test_synthetic_limits():
    bundle = load_data(DataSpec(name="synthetic", samples=64, limit_train=10, limit_test=5))
    assert len(bundle.train) == 10 and len(bundle.test) == 5


def test_digits_shapes_and_split():
    bundle = load_data(DataSpec(name="digits"))
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert len(bundle.train) == 1437 and len(bundle.test) == 360
    x = bundle.train.tensors[0]
    assert x.shape == (1437, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    again = load_data(DataSpec(name="digits", limit_train=100))
    assert len(again.train) == 100
    assert torch.equal(again.train.tensors[1], bundle.train.tensors[1][:100])


def test_spec_needs_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one of 'name'"):
        DataSpec()
    with pytest.raises(ValidationError, match="exactly one of 'name'"):
        DataSpec(name="digits", python="x.py:f")
    with pytest.raises(ValidationError):
        DataSpec(name="imagenet")  # not a built-in source
    with pytest.raises(ValidationError):
        DataSpec(name="digits", color=True)


def test_tiny_idx_files_load_and_normalize(tiny_fmnist):
    bundle = load_data(DataSpec(name="fashion-mnist", root=str(tiny_fmnist), limit_test=4))
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert len(bundle.train) == 20 and len(bundle.test) == 4
    x, y = bundle.train[3]
    assert x.shape == (1, 28, 28) and int(y) == 3
    expected = (3 * 25 / 255.0 - fm.MEAN) / fm.STD
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-6)
    assert "0.286" in bundle.transform


def test_env_var_overrides_default(tiny_fmnist, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tiny_fmnist))
    assert len(load_data(DataSpec(name="fashion-mnist")).train) == 20


def test_missing_dir_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_data(DataSpec(name="fashion-mnist"))
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)


def test_truncated_idx_names_the_file(tiny_fmnist):
    path = tiny_fmnist / fm.FILES["train"][0]
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_data(DataSpec(name="fashion-mnist", root=str(tiny_fmnist)))


def test_corrupt_gzip_and_wrong_magic(tiny_fmnist):
    labels = tiny_fmnist / fm.FILES["test"][1]
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*gzip"):
        load_data(DataSpec(name="fashion-mnist", root=str(tiny_fmnist)))
    _write_idx(labels, np.zeros(10), 2051)  # images magic on a labels file
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        load_data(DataSpec(name="fashion-mnist", root=str(tiny_fmnist)))


@pytest.mark.skipif(not Path(fm.DEFAULT_DIR, fm.FILES["test"][0]).is_file(),
                    reason="Fashion-MNIST not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    bundle = load_data(DataSpec(name="fashion-mnist", limit_train=1000, limit_test=1000))
    assert len(bundle.train) == 1000 and len(bundle.test) == 1000
    x = bundle.train.tensors[0]
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalized
    assert set(bundle.test.tensors[1].tolist()) == set(range(10))


def _write_loader(tmp_path: Path, body: str) -> str:
    path = tmp_path / "my_data.py"
    path.write_text("import torch\nfrom torch.utils.data import TensorDataset\n" + body)
    return str(path)


def test_python_loader_builds_bundle(tmp_path):
    path = _write_loader(tmp_path, (
        "def get():\n"
        "    x = torch.randn(30, 2, 5, 5)\n"
        "    y = torch.arange(30) % 3\n"
        "    return TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:])\n"
    ))
    bundle = load_data(DataSpec(python=f"{path}:get", limit_train=7))
    assert bundle.input_shape == (2, 5, 5) and bundle.num_classes == 3
    assert len(bundle.train) == 7 and len(bundle.test) == 10


@pytest.mark.parametrize("ref_suffix, body, message", [
    (":get", "", "has no function 'get'"),
    (":get", "def get():\n    return [1, 2, 3]\n", "must return \\(train_dataset, test_dataset\\)"),
    (":get", "def get():\n    raise OSError('disk gone')\n", "raised OSError: disk gone"),
    (":get", "def get():\n    return TensorDataset(torch.zeros(3, 2)), None\n", "not a map-style"),
    ("", "", "is not 'file.py:function'"),
])
def test_python_loader_errors(tmp_path, ref_suffix, body, message):
    path = _write_loader(tmp_path, body)
    with pytest.raises(DataError, match=message):
        load_data(DataSpec(python=path + ref_suffix))


def test_python_loader_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataSpec(python=f"{tmp_path}/absent.py:get"))


def test_bundle_rejects_integer_inputs():
    ints = TensorDataset(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match="float tensors"):
        bundle_from_datasets(ints, ints)


def test_make_loader_order_depends_only_on_seed():
    ds = TensorDataset(torch.arange(50).float(), torch.arange(50))

    def order(seed):
        return torch.cat([y for _, y in make_loader(ds, 8, shuffle=True, seed=seed)])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == list(range(50))
