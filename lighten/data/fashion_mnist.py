"""Fashion-MNIST from the four gz IDX files, read with numpy (no torchvision)."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lighten.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LIGHTEN_FASHION_MNIST"
# Training-set statistics; recorded in DataBundle.transform so users can reproduce inputs.
MEAN, STD = 0.2860, 0.3530
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def resolve_dir(root: str | None) -> Path:
    """``root`` beats the env var, which beats the system default."""
    chosen = root or os.environ.get(ENV_VAR) or DEFAULT_DIR
    path = Path(chosen).expanduser()
    missing = [f for pair in FILES.values() for f in pair if not (path / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {str(path)!r} (missing {missing[0]}); "
            f"run `apt-get install dataset-fashion-mnist` or set {ENV_VAR} to the folder "
            "holding the four .gz files"
        )
    return path


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """Parse one gz IDX file; anything truncated or foreign is a DataError naming the file."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{str(path)!r} is not a readable gzip file ({exc}); "
                        "re-download or reinstall the dataset") from exc
    if len(raw) < 8:
        raise DataError(f"{str(path)!r} is truncated (no IDX header); re-download it")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{str(path)!r} has IDX magic number {found}, expected {magic}; "
                        "the file is corrupt or not the one its name says")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{str(path)!r} holds {len(raw) - header} data bytes, expected "
                        f"{expected} for shape {tuple(dims)}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(directory: Path, split: str, *, limit: int | None) -> TensorDataset:
    images_file, labels_file = FILES[split]
    images = read_idx(directory / images_file, magic=_IMAGES_MAGIC)
    labels = read_idx(directory / labels_file, magic=_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{split} split in {str(directory)!r} has {len(images)} images but "
                        f"{len(labels)} labels; reinstall the dataset")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = ((x - MEAN) / STD).unsqueeze(1)  # (N, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)
