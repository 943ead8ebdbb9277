"""Weight clustering (``share.kmeans``): each layer's weights share 2^b values (Deep Compression).

Per layer, the non-zero weights are clustered into ``2^bits`` centroids by 1-D k-means; every
weight becomes its centroid, so the layer holds at most ``2^bits`` distinct values plus the
pruned zeros, which stay exactly 0 and outside the codebook. The artifact then stores the layer
as packed b-bit indices plus the codebook (the ``palette`` / ``sparse_palette`` encodings of
:mod:`lighten.artifact`), and ``encode.entropy`` codes those indices near their entropy.

k-means is written in torch, not scikit-learn: in one dimension the nearest centroid is found by
a binary search among sorted centroids (``torch.searchsorted`` on the midpoints), O(n log k) per
iteration with no distance matrix, deterministic, and the three initialisations of Han et al.
(linear: evenly spaced between min and max, their best, as it keeps the rare large weights;
density: evenly spaced quantiles; k-means++) are a line each.

Codebook fine-tuning (``finetune:``) uses a parametrization rather than a callback that projects
the weights back after each step: ``weight = [0, c_1 .. c_K][index]`` with the codebook ``c`` a
Parameter and ``index`` a fixed buffer (0 = pruned). Autograd's gather backward sums the
gradients of all weights sharing a centroid into it (Han et al.'s rule), exactly, for every
optimizer — a projection after an Adam step would average per-weight adaptive updates instead —
and the assignment cannot change. After fine-tuning the parametrization is removed, leaving
plain layers (``torch.nn.utils.parametrize``: reparametrize, train, make permanent), so the
saved model, its ONNX export and every later step see standard modules.

Han et al. leave biases float; in a small, sparse model they are not negligible (LeNet-5's 236
float32 biases took ~800 of a ~7,000-byte coded artifact), so ``bias_bits`` clusters each layer's
bias into its own codebook, fine-tuned the same way, and ``float16`` rounds the codebooks (and
every other float32 tensor, such as BatchNorm statistics) to float16 values, which the artifact
then stores in half the bytes.

``bits: auto`` measures each layer's sensitivity (relative output error on calibration inputs
with only that layer clustered at each candidate width) and picks the widths with the least
total error whose index bytes fit ``budget_bytes`` (the knapsack of ``quant.mixed``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn.utils import parametrize

from lighten.errors import ModelError, UnsupportedError
from lighten.quant.mixed import choose_bits, layer_output_error, weight_bytes
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext
from lighten.task import Inputs, batch_inputs

__all__ = ["KMeansConfig", "cluster_model_", "clustered_layers", "kmeans_1d"]


class KMeansConfig(StepConfig):
    """Per-layer weight clustering: 2^bits shared values per layer, pruned zeros kept."""

    bits: int | dict[str, int] | Literal["auto"] = Field(
        4, description="index bits per weight: one width for every layer, {layer: bits} (other "
        "layers stay float), or auto (per layer, from measured sensitivity under budget_bytes)")
    budget_bytes: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="with bits: auto, the index bytes allowed: "
        "a fraction (<= 1) of the float32 bytes of the clustered non-zero weights (uniform 4-bit "
        "= 0.125) or a whole number of bytes (> 1)")
    candidates: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6], min_length=1,
                                  description="with bits: auto, the widths to choose from")
    init: Literal["linear", "density", "kmeans++"] = Field(
        "linear", description="centroid initialisation: linear (Han et al.'s best), density "
        "(quantiles), kmeans++")
    iterations: int = Field(50, ge=1, description="at most this many k-means iterations")
    calib_samples: int = Field(256, ge=1, description="with bits: auto, calibration inputs")
    ignore: list[str] = Field(default_factory=list, description="module names left in float")
    bias_bits: int | None = Field(
        None, ge=1, le=8, description="cluster each clustered layer's bias too, into "
        "2^bias_bits values (its codebook fine-tuned with the weights'); unset: biases stay "
        "float. LeNet-5's 236 float32 biases cost ~800 of a ~7,000-byte coded artifact")
    float16: bool = Field(
        False, description="after fine-tuning, round every float32 value of the model (the "
        "codebooks, biases and BatchNorm statistics left float) to float16: the artifact then "
        "stores them in half the bytes")

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, v):
        widths = v.values() if isinstance(v, dict) else [] if v == "auto" else [v]
        bad = [b for b in widths if not 1 <= b <= 8]
        if bad:
            raise ValueError(f"bits {bad[0]} is not supported; use 1..8 (2 to 256 centroids)")
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates_in_range(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not 1 <= b <= 8]
        if bad:
            raise ValueError(f"candidate bit width {bad[0]} is not supported; use 1..8")
        return sorted(set(v))

    @model_validator(mode="after")
    def _budget_with_auto(self):
        if self.bits == "auto" and self.budget_bytes is None:
            raise ValueError("bits: auto needs budget_bytes (e.g. 0.1 of the float32 bytes of "
                             "the non-zero weights, or a number of bytes like 20000)")
        if self.bits != "auto" and self.budget_bytes is not None:
            raise ValueError("budget_bytes only applies with bits: auto; remove it or set "
                             "bits: auto")
        if self.budget_bytes is not None and self.budget_bytes > 1 and (
                self.budget_bytes != int(self.budget_bytes)):
            raise ValueError(f"budget_bytes {self.budget_bytes} is neither a fraction (<= 1) "
                             "nor a whole number of bytes; e.g. 0.1 or 20000")
        return self


# ----------------------------------------------------------------------------- k-means


def kmeans_1d(values: torch.Tensor, k: int, *, init: str = "linear", iterations: int = 50,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd): (centroids sorted ascending (k',), index of each value's centroid).

    ``k' = min(k, distinct values)``; with no more distinct values than ``k`` they are the
    centroids themselves (exact). Empty clusters keep their centroid. Sums run in float64."""
    x = values.detach().reshape(-1).double()
    distinct = torch.unique(x)
    if distinct.numel() <= k:
        return distinct.to(values.dtype), torch.searchsorted(distinct, x)
    if init == "linear":
        c = _linear_init(x, k)
    elif init == "density":
        c = torch.quantile(x if x.numel() <= 1 << 24 else x[:: x.numel() // (1 << 23) + 1],
                           (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    else:
        c = _kmeans_pp(x, k, seed)
    for _ in range(iterations):
        c, _ = torch.sort(c)
        index = torch.searchsorted((c[1:] + c[:-1]) / 2, x)
        counts = torch.bincount(index, minlength=k)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, index, x)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if torch.equal(new, c):
            break
        c = new
    c, _ = torch.sort(c)
    index = torch.searchsorted((c[1:] + c[:-1]) / 2, x)
    used = torch.bincount(index, minlength=c.numel()) > 0  # empty clusters leave the codebook
    remap = torch.cumsum(used.long(), 0) - 1
    return c[used].to(values.dtype), remap[index]


def _linear_init(x: torch.Tensor, k: int) -> torch.Tensor:
    """Evenly spaced centroids over [min, max] with the band between the largest negative and
    the smallest positive value cut out.

    Han et al. space them over [min, max]; after magnitude pruning the band around 0 is empty,
    so centroids there would stay empty. Collapsing that band spaces them over what is occupied
    (for a dense layer the band is ~0 wide and this is their linear initialisation)."""
    neg, pos = x[x < 0], x[x > 0]
    steps = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    if neg.numel() == 0 or pos.numel() == 0:
        return float(x.min()) + steps * float(x.max() - x.min())
    span_neg, span_pos = float(neg.max() - neg.min()), float(pos.max() - pos.min())
    p = steps * (span_neg + span_pos)  # positions along the two occupied intervals
    return torch.where(p <= span_neg, float(neg.min()) + p, float(pos.min()) + p - span_neg)


def _kmeans_pp(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability ~ squared distance."""
    g = torch.Generator().manual_seed(seed)
    sample = x if x.numel() <= 65536 else x[torch.randperm(x.numel(), generator=g)[:65536]]
    centroids = [sample[torch.randint(sample.numel(), (1,), generator=g)].item()]
    d2 = (sample - centroids[0]).pow(2)
    for _ in range(k - 1):
        if float(d2.sum()) == 0:
            break
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g).item()
        centroids.append(sample[pick].item())
        d2 = torch.minimum(d2, (sample - centroids[-1]).pow(2))
    c = torch.tensor(sorted(set(centroids)), dtype=torch.float64)
    if c.numel() < k:  # fewer distinct picks than k: fill with evenly spaced ones
        c = torch.cat([c, torch.linspace(float(x.min()), float(x.max()), k - c.numel(),
                                         dtype=torch.float64)])
    return c


def cluster_weight(weight: torch.Tensor, bits: int, *, init: str = "linear",
                   iterations: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook (k,), index of weight's shape: 0 for an exact zero, i + 1 for centroid i),
    computed on the CPU, returned on the weight's device."""
    w = weight.detach().cpu()
    keep = w != 0
    index = torch.zeros(w.shape, dtype=torch.long)
    if not keep.any():
        return torch.zeros(0, dtype=w.dtype, device=weight.device), index.to(weight.device)
    codebook, assign = kmeans_1d(w[keep], 1 << bits, init=init, iterations=iterations,
                                 seed=seed)
    index[keep] = assign + 1
    return codebook.to(weight.device), index.to(weight.device)


# ----------------------------------------------------------------------------- codebook layers


class SharedWeight(nn.Module):
    """Parametrization ``weight = [0, codebook][index]``: the codebook is what trains.

    ``right_inverse`` reads the codebook back from a clustered weight (one weight per centroid,
    exact), so registering it on a layer whose weight is already clustered changes nothing."""

    def __init__(self, index: torch.Tensor, size: int):
        super().__init__()
        self.register_buffer("index", index)
        self.size = size

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return F.pad(codebook, (1, 0))[self.index]  # 0 at index 0: pruned weights stay 0

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        codebook = torch.zeros(self.size + 1, dtype=weight.dtype, device=weight.device)
        codebook.scatter_(0, self.index.reshape(-1), weight.detach().reshape(-1))
        return codebook[1:]


def clustered_layers(model: nn.Module, ignore=()) -> dict[str, nn.Module]:
    """Modules with their own weight Parameter of 2+ dims (Linear, convs, embeddings), outside
    ``ignore`` (names or their descendants), each weight counted once."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name == i or name.startswith(f"{i}.") for i in ignore):
            continue
        weight = module._parameters.get("weight")
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
            out[name] = module
    return out


@torch.no_grad()
def cluster_model_(model: nn.Module, bits: dict[str, int], *, init: str = "linear",
                   iterations: int = 50, seed: int = 0, bias_bits: int | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Cluster each named layer's weight (and with ``bias_bits`` its bias) in place; returns
    (codebook, index) per clustered tensor, keyed ``layer.weight`` / ``layer.bias``."""
    out = {}
    for name, b in bits.items():
        module = model.get_submodule(name)
        for tensor, width in (("weight", b), ("bias", bias_bits)):
            param = module._parameters.get(tensor)
            if width is None or not isinstance(param, nn.Parameter):
                continue
            codebook, index = cluster_weight(param, width, init=init, iterations=iterations,
                                             seed=seed)
            param.copy_(F.pad(codebook, (1, 0))[index])
            out[f"{name}.{tensor}"] = codebook, index
    return out


def finetune_codebooks(model: nn.Module, clusters: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       ctx: StepContext, config) -> None:
    """Fine-tune with every clustered tensor's codebook trainable and its assignment fixed."""
    done = []
    try:
        for key, (codebook, index) in clusters.items():
            name, _, tensor = key.rpartition(".")
            parametrize.register_parametrization(
                model.get_submodule(name), tensor, SharedWeight(index, codebook.numel()),
                unsafe=True)
            done.append((name, tensor))
        ctx.finetune(model, config)
    finally:
        for name, tensor in done:
            parametrize.remove_parametrizations(model.get_submodule(name), tensor,
                                                leave_parametrized=True)


@torch.no_grad()
def round_float16_(model: nn.Module) -> None:
    """Round every float32 parameter and buffer (weights, biases, BatchNorm statistics) to
    float16 values, kept float32; tensors with values beyond float16's range stay as they are.
    Clustered weights keep their zeros and at most their codebook's count of values, and the
    artifact stores a tensor whose values are all float16 in float16: half the bytes."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dtype == torch.float32 and t.numel() and bool(t.abs().max() <= 65504):
            t.copy_(t.half().float())


def _bias_facts(module: nn.Module, cluster) -> dict:
    """Report fields of a layer's bias: its distinct values when it was clustered."""
    bias = module._parameters.get("bias")
    if cluster is None or bias is None:
        return {}
    return {"bias_centroids": cluster[0].numel(),
            "bias_distinct": int(torch.unique(bias.detach()).numel())}


# ----------------------------------------------------------------------------- bits: auto


@torch.no_grad()
def clustering_sensitivity(model: nn.Module, layers, inputs, candidates, *,
                           init: str = "linear", iterations: int = 50
                           ) -> dict[str, dict[int, float]]:
    """Relative output error (noise / signal power) with one layer clustered at a time."""

    def clustered(original: torch.Tensor, bits: int) -> torch.Tensor:
        codebook, index = cluster_weight(original, bits, init=init, iterations=iterations)
        return F.pad(codebook, (1, 0))[index]

    return layer_output_error(model, layers, inputs, candidates, clustered)


def _widths(model: nn.Module, cfg: KMeansConfig, ctx: StepContext, layers: dict[str, nn.Module]
            ) -> dict[str, int]:
    if isinstance(cfg.bits, int):
        return dict.fromkeys(layers, cfg.bits)
    if isinstance(cfg.bits, dict):
        unknown = [n for n in cfg.bits if n not in layers]
        if unknown:
            raise ModelError(f"share.kmeans bits names {unknown[0]!r}, which is not a layer with "
                             f"a weight to cluster; layers: {', '.join(layers) or 'none'}")
        return dict(cfg.bits)
    nonzero = {n: max(int((m.weight != 0).sum()), 1) for n, m in layers.items()}
    budget = (int(cfg.budget_bytes * 4 * sum(nonzero.values())) if cfg.budget_bytes <= 1
              else int(cfg.budget_bytes))
    inputs = [Inputs(batch_inputs(b)) for b in ctx.calibration_batches(cfg.calib_samples)]
    sens = clustering_sensitivity(model, list(layers), inputs, cfg.candidates, init=cfg.init,
                                  iterations=cfg.iterations)
    bits = choose_bits(sens, nonzero, budget)
    used = sum(weight_bytes(nonzero[n], b) for n, b in bits.items())
    ctx.note(f"share.kmeans auto: {used} of {budget} budget index bytes; bits "
             + ", ".join(f"{n}={b}" for n, b in bits.items()))
    ctx.summary["sensitivity"] = {n: {str(b): e for b, e in s.items()} for n, s in sens.items()}
    return bits


@register_step("share.kmeans", KMeansConfig,
               needs_data=lambda c: "calibration inputs" if c.bits == "auto" else None)
def share_kmeans(model: nn.Module, cfg: KMeansConfig, ctx: StepContext) -> nn.Module:
    """Weight clustering: per-layer codebooks of 2^bits values, pruned zeros kept exactly 0."""
    layers = clustered_layers(model, cfg.ignore)
    seen: dict[int, str] = {}
    for name in list(layers):  # a weight tied to another layer's would come apart: keep float
        pid = id(layers[name].weight)
        if pid in seen:
            ctx.note(f"{name} left in float: its weight is tied to {seen[pid]}")
            ctx.layer(name, "keep float", before="float", after="float",
                      reason=f"weight tied to {seen[pid]}")
            del layers[name]
            layers.pop(seen[pid], None)
        seen[pid] = name
    if not layers:
        raise UnsupportedError("share.kmeans found no layer with a weight of 2+ dims to cluster "
                               "(Linear, Conv, Embedding) outside ignore; after quant.* steps "
                               "weights are integers: put share.kmeans before quantization")
    bits = _widths(model, cfg, ctx, layers)
    before = {n: int((layers[n].weight != 0).sum()) for n in bits}
    clusters = cluster_model_(model, bits, init=cfg.init, iterations=cfg.iterations,
                              seed=ctx.seed, bias_bits=cfg.bias_bits)
    if cfg.finetune is not None and cfg.finetune.epochs:
        finetune_codebooks(model, clusters, ctx, cfg.finetune)
    if cfg.float16:
        round_float16_(model)
    for name, module in layers.items():
        w = module.weight.detach()
        if name not in bits:
            ctx.layer(name, "keep float", before="float", after="float", reason="not in bits")
            continue
        distinct = int(torch.unique(w[w != 0]).numel())
        zeros = float((w == 0).float().mean())
        ctx.layer(name, "cluster", before=f"float, {before[name]} non-zero",
                  after=f"{distinct} values ({bits[name]} bits)", bits=bits[name],
                  centroids=clusters[f"{name}.weight"][0].numel(), distinct=distinct,
                  params=int(w.numel()),
                  sparsity=round(zeros, 4),
                  index_bytes=math.ceil(before[name] * bits[name] / 8),
                  **_bias_facts(module, clusters.get(f"{name}.bias")))
    ctx.summary["bits"] = bits
    if cfg.bias_bits is not None:
        ctx.summary["bias_bits"] = cfg.bias_bits
    return model
