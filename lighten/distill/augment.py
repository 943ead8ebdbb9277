"""Consistent teaching: the student and the teacher see the SAME augmented view of an image.

Beyer et al. 2022 ("Knowledge distillation: a good teacher is patient and consistent") and
Stanton et al. 2021 found soft targets pay when the student matches the teacher's function on
views the labels cannot follow (shifted, flipped, mixed images) rather than on the fixed
dataset. ``distill: {augment: {crop: 2, flip: true, mixup: 0.2, views: 4}}`` turns it on:

* ``views: K`` (K > 0): K augmented copies of the training set are drawn once (crop offsets,
  flips, mixup partners and weights: a few bytes per image and view) and the teacher's logits
  are computed once per view (K teacher passes over the training set); every time the loader
  asks for an image it gets one of its K views, chosen at random, with the matching cached row.
* ``views: 0``: a fresh view at every step and the teacher run live on the same batch.

Labels follow the view: a mixed image's label loss is ``lam CE(y_a) + (1 - lam) CE(y_b)``
(the classes' soft target; ``lam >= 0.5``, so ``y_a`` is the dominant label the losses that
need one class, such as DKD, use). A student trained on the labels alone through the same
``distill`` step (``losses: {ce: 1}``) gets exactly the same views, so a comparison with it is
fair.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from lighten.errors import DataError
from lighten.step import StrictModel


class AugmentConfig(StrictModel):
    """``distill: {augment: ...}``: which augmentations, and how many fixed views."""

    crop: int = Field(2, ge=0, description="pad by this many pixels (background value), then "
                      "crop back at a random offset; 0: no crop")
    flip: bool = Field(True, description="random horizontal flip")
    mixup: float = Field(0.0, ge=0, description="mix each image with another one, weight "
                         "lam ~ Beta(a, a) (kept >= 0.5); 0: off")
    views: int = Field(4, ge=0, le=64, description="K fixed views per image with the teacher's "
                       "logits cached (K teacher passes); 0: a fresh view every step, teacher "
                       "run live")
    seed: int = Field(0, description="seed of the views (the same for every run compared)")

    @model_validator(mode="after")
    def _something(self):
        if not self.crop and not self.flip and not self.mixup:
            raise ValueError("augment: crop, flip and mixup are all off; turn one on or remove "
                             "augment")
        return self


@dataclass
class ViewParams:
    """Per image and view: crop offsets, flip, mixup partner and weight, each (K, N)."""

    oy: Tensor
    ox: Tensor
    flip: Tensor
    partner: Tensor
    lam: Tensor


def draw_params(shape: tuple[int, ...], n: int, cfg: AugmentConfig,
                generator: torch.Generator) -> ViewParams:
    """Parameters of ``shape`` views of images among ``n`` (mixup partners in [0, n))."""
    span = 2 * cfg.crop + 1
    oy = torch.randint(0, span, shape, generator=generator)
    ox = torch.randint(0, span, shape, generator=generator)
    flip = (torch.rand(shape, generator=generator) < 0.5) if cfg.flip else \
        torch.zeros(shape, dtype=torch.bool)
    if cfg.mixup:
        partner = torch.randint(0, n, shape, generator=generator)
        # Beta(a, a) as g1 / (g1 + g2) of two gammas; torch's sampler takes no generator
        g1 = _gamma(cfg.mixup, shape, generator)
        g2 = _gamma(cfg.mixup, shape, generator)
        lam = g1 / (g1 + g2).clamp_min(1e-12)
        lam = torch.maximum(lam, 1 - lam)  # y_a stays the dominant label
    else:
        partner = torch.full(shape, -1)  # -1: no partner (the image itself)
        lam = torch.ones(shape)
    return ViewParams(oy, ox, flip, partner, lam.float())


def _gamma(a: float, shape, generator: torch.Generator) -> Tensor:
    """Gamma(a, 1) samples from ``generator`` (Marsaglia-Tsang, boosted for a < 1)."""
    boost = a < 1
    d = (a + 1 if boost else a) - 1 / 3
    c = 1 / (9 * d) ** 0.5
    out = torch.empty(shape)
    todo = torch.ones(shape, dtype=torch.bool)
    while todo.any():
        m = int(todo.sum())
        z = torch.randn(m, generator=generator)
        v = (1 + c * z) ** 3
        u = torch.rand(m, generator=generator)
        ok = (v > 0) & (u.clamp_min(1e-30).log() < 0.5 * z * z + d - d * v
                        + d * v.clamp_min(1e-30).log())
        idx = todo.nonzero(as_tuple=True)
        sel = tuple(i[ok] for i in idx)
        out[sel] = d * v[ok]
        todo[sel] = False
    if boost:
        out = out * torch.rand(shape, generator=generator).clamp_min(1e-30) ** (1 / a)
    return out


def _images(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """All inputs (N, C, H, W) and integer labels (N,) of an image classification set."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        x, y = tensors
    else:
        items = [dataset[i] for i in range(len(dataset))]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.as_tensor([int(b) for _, b in items])
    if x.dim() != 4 or not x.is_floating_point():
        raise DataError(f"distill augment needs float image inputs (C, H, W), got "
                        f"{tuple(x.shape[1:])} {x.dtype}; remove augment from the distill step")
    if y.dim() != 1:
        raise DataError("distill augment needs one integer label per image; remove augment")
    return x, y.long()


class AugmentedViews(Dataset):
    """Items ``(view, [y_a, y_b, lam, row])``: an augmented image, its two labels and mixing
    weight, and its row in the cached teacher logits (``-1``: none, a fresh view)."""

    def __init__(self, base: Dataset, cfg: AugmentConfig):
        self.cfg = cfg
        self.images, self.labels = _images(base)
        self.n = len(self.labels)
        self.h, self.w = self.images.shape[-2:]
        p = cfg.crop
        self.padded = F.pad(self.images, (p, p, p, p), value=float(self.images.min()))
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.params = draw_params((cfg.views, self.n), self.n, cfg,
                                  torch.Generator().manual_seed(cfg.seed)) if cfg.views else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """A whole batch at once (the DataLoader's batched fetch): one view per image, drawn
        among the K fixed ones (or fresh with ``views: 0``)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.params is not None:
            view = torch.randint(self.cfg.views, (len(index),), generator=self.generator)
            x, partner, lam = self.render(view, index)
            row = (view * self.n + index).double()
        else:
            p = draw_params((len(index),), self.n, self.cfg, self.generator)
            q = draw_params((len(index),), self.n, self.cfg, self.generator)
            partner, lam = p.partner, p.lam
            x = self._mix(self._crop_batch(index, p.oy, p.ox, p.flip), partner, lam,
                          lambda j: self._crop_batch(j, q.oy, q.ox, q.flip))
            row = torch.full((len(index),), -1.0, dtype=torch.float64)
        other = torch.where(partner >= 0, partner, index)
        target = torch.stack([self.labels[index].double(), self.labels[other].double(),
                              lam.double(), row], 1)  # (B, 4)
        return list(zip(x, target, strict=True))

    def render(self, view: Tensor | int, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images ``index`` (B,) as view(s) ``view`` show them, (B, C, H, W), with their mixup
        partners and weights: what the student gets, and what the teacher is cached on."""
        p = self.params
        view = torch.as_tensor(view).expand(len(index))
        partner, lam = p.partner[view, index], p.lam[view, index]
        x = self._crop_batch(index, p.oy[view, index], p.ox[view, index], p.flip[view, index])

        def crop_partner(j: Tensor) -> Tensor:
            return self._crop_batch(j, p.oy[view, j], p.ox[view, j], p.flip[view, j])

        return self._mix(x, partner, lam, crop_partner), partner, lam

    @staticmethod
    def _mix(x: Tensor, partner: Tensor, lam: Tensor, crop_partner) -> Tensor:
        if not bool((lam < 1).any()):
            return x
        other = crop_partner(partner.clamp_min(0))
        w = lam[:, None, None, None]
        return w * x + (1 - w) * other

    def _crop_batch(self, index: Tensor, oy: Tensor, ox: Tensor, flip: Tensor) -> Tensor:
        """Crop (B, C, H, W) windows at offsets (oy, ox) of the padded images, mirrored where
        ``flip``: one gather of flat pixel positions (fancy indexing is 5x slower)."""
        b, c = len(index), self.padded.shape[1]
        wp = self.padded.shape[-1]
        cols = torch.arange(self.w).expand(b, self.w)
        cols = torch.where(flip[:, None], self.w - 1 - cols, cols) + ox[:, None]  # (B, W)
        rows = oy[:, None] + torch.arange(self.h)  # (B, H)
        flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, -1).expand(b, c, -1)
        src = self.padded[index].reshape(b, c, -1)  # (B, C, Hp * Wp)
        return src.gather(2, flat).reshape(b, c, self.h, self.w)


def split_targets(targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y_a, y_b, lam, row)`` from a batch of :class:`AugmentedViews` targets (B, 4)."""
    return (targets[:, 0].long(), targets[:, 1].long(), targets[:, 2].float(),
            targets[:, 3].long())


def mixed_cross_entropy(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: Tensor, *,
                        label_smoothing: float = 0.0) -> Tensor:
    """``mean(lam CE(y_a) + (1 - lam) CE(y_b))``: cross-entropy against the mixed one-hot."""
    c = logits.shape[-1]
    soft = lam[:, None] * F.one_hot(y_a, c) + (1 - lam[:, None]) * F.one_hot(y_b, c)
    return F.cross_entropy(logits, soft.to(logits.dtype), label_smoothing=label_smoothing)


_MEMO: dict[tuple, tuple[Tensor, Tensor | None]] = {}


def view_logits(teachers, views: AugmentedViews, task, *, tap=None, embedding: str | None = None,
                batch_size: int = 512) -> tuple[Tensor, Tensor | None]:
    """The teachers' logits for every image of every view, ``(K * N, C)``, row ``v * N + i``;
    with ``tap`` / ``embedding`` (a teacher :class:`~lighten.distill.features.FeatureTap` key
    such as ``fc:input``) also that embedding per row (relational losses read nothing else).
    Remembered for the last (teacher weights, images, views) so runs compared in one process
    (labels, hinton, dkd, seeds) pay the K teacher passes once."""
    key = (_fingerprint(teachers.models), _fingerprint([views.images]),
           views.cfg.model_dump_json(), views.n, embedding)
    if key in _MEMO:
        return _MEMO[key]
    out, emb = [], []
    with torch.inference_mode():
        for v in range(views.cfg.views):
            for start in range(0, views.n, batch_size):
                index = torch.arange(start, min(views.n, start + batch_size))
                x = views.render(v, index)[0]
                out.append(teachers(tuple(task.as_inputs(x))).float())
                if embedding is not None:
                    emb.append(tap.features[embedding].flatten(1).float().clone())
    _MEMO.clear()
    _MEMO[key] = (torch.cat(out), torch.cat(emb) if emb else None)
    return _MEMO[key]


def _fingerprint(items) -> str:
    h = hashlib.blake2b(digest_size=16)
    for item in items:
        tensors = [item] if isinstance(item, Tensor) else list(item.state_dict().values())
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


__all__ = ["AugmentConfig", "AugmentedViews", "mixed_cross_entropy", "split_targets",
           "view_logits"]
