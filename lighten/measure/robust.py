"""Accuracy under small input perturbations: does compression make the model brittle?

Two cheap probes on a fixed random subset of the test set:

* noise: add Gaussian noise of ``noise_std`` in *normalized* input units;
* shift: translate each image by a random whole number of pixels in [-shift_pixels,
  shift_pixels] on each axis and rotate it by a random angle in [-rotate_degrees,
  rotate_degrees] (``affine_grid`` + ``grid_sample``, border padding so the background is
  repeated rather than replaced by zeros, which is not background after normalization).

Inputs that are not images (fewer than two trailing spatial dimensions) get no shift probe:
``robust_shift_acc`` is None for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lighten.errors import DataError
from lighten.measure.metrics import accuracy

BATCH = 256


def robustness(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    dataset,
    *,
    samples: int = 1000,
    noise_std: float = 0.1,
    shift_pixels: int = 2,
    rotate_degrees: float = 10.0,
    seed: int = 0,
) -> dict[str, float | None]:
    """Clean, noisy and shifted/rotated top-1 accuracy of ``predict_fn`` (numpy batch -> logits)."""
    n = len(dataset)
    if n == 0 or samples < 1:
        raise DataError(f"robustness needs samples >= 1 from a non-empty dataset "
                        f"(dataset has {n}, samples={samples})")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(samples, n)]
    items = [dataset[int(i)] for i in idx]
    x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items])
    y = torch.as_tensor([int(item[1]) for item in items])

    noisy = x + noise_std * torch.randn(x.shape, generator=g)
    result: dict[str, float | None] = {
        "robust_clean_acc": accuracy(_predict(predict_fn, x), y),
        "robust_noise_acc": accuracy(_predict(predict_fn, noisy), y),
        "robust_shift_acc": None,
    }
    if x.ndim >= 4:  # (N, C..., H, W)
        moved = shift_rotate(x, shift_pixels=shift_pixels, rotate_degrees=rotate_degrees,
                             generator=g)
        result["robust_shift_acc"] = accuracy(_predict(predict_fn, moved), y)
    return result


def shift_rotate(x: torch.Tensor, *, shift_pixels: int, rotate_degrees: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Random per-sample integer translation plus rotation of the last two dims of ``x``."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    images = x.reshape(n, -1, h, w)  # (N, C, H, W)
    shifts = torch.randint(-shift_pixels, shift_pixels + 1, (n, 2), generator=generator)
    angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotate_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    # grid coords run over [-1, 1] across the image, so one pixel is 2/W (align_corners=False);
    # the grid samples the source, hence the minus sign for a shift of +k pixels.
    theta[:, 0, 2] = -shifts[:, 0].float() * 2 / w
    theta[:, 1, 2] = -shifts[:, 1].float() * 2 / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.reshape(x.shape)


def _predict(predict_fn, x: torch.Tensor) -> np.ndarray:
    outs = [np.asarray(predict_fn(x[i : i + BATCH].numpy())) for i in range(0, len(x), BATCH)]
    return np.concatenate(outs)
