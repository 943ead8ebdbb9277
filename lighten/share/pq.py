"""Product quantization (``share.pq``): weights stored as codes into a small codebook.

Each weight row of a Linear, or each filter of a conv, is cut into sub-vectors of ``d``
consecutive weights (``subvector: kernel`` on a k x k conv: one sub-vector per kernel, as in
"And the Bit Goes Down", Stock et al. 2020). k-means learns ``2^codebook_bits`` centroids per
layer (``codebook: layer``) or per sub-space (``codebook: subspace``, Jegou et al.'s PQ: one
codebook per column block); each sub-vector is stored as the index of its centroid. A 3 x 3
conv with 8-bit codes stores 8 bits per 9 weights plus the codebook.

``weighted: true`` measures the layer's inputs on calibration data and clusters under the
metric ``(w - c)^T H (w - c)`` with ``H = E[x x^T]`` of that sub-space's inputs, so the layer's
*output* error is what k-means minimizes (BGD's objective). This is why k-means is written in
torch here: scikit-learn's ``KMeans`` takes per-sample weights, not a per-sample metric.

Pruned zeros: a sub-vector that is all zero (a pruned kernel, a removed filter) gets a reserved
code whose codeword is fixed at zero, so it stays exactly zero through fine-tuning. Zeros inside
a partly pruned sub-vector are approximated by its centroid like any weight: keeping them would
need a bit mask (1 bit per weight), more than the codes themselves (8/9 bit per weight).
Structured pruning (``prune.channels``) composes without loss of structure: layers shrink first.

The layers become :class:`PQLinear` / :class:`PQConv2d` (registered module types): a
``codebook`` Parameter (trained by ``finetune:`` while the codes stay fixed; every sub-vector
sharing a centroid adds its gradient to it) and a ``codes`` buffer; ``forward`` rebuilds the
weight with an embedding lookup. The ONNX export keeps that lookup as a ``Gather`` over the
stored codes: the deployed file is as small as the artifact, and ONNX Runtime folds the constant
subgraph into a dense weight once when the session is created, so inference speed is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lighten.errors import UnsupportedError
from lighten.hooks import forward_batches_with_hooks
from lighten.modules import register_module_type, require_modules, set_submodule
from lighten.registry import register_step
from lighten.step import StepConfig, StepContext

__all__ = ["PQConfig", "PQConv2d", "PQLinear", "kmeans", "product_quantize_"]

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class PQConfig(StepConfig):
    subvector: int | Literal["kernel"] = Field(
        "kernel", description="sub-vector length for k x k convs (k > 1); 'kernel' = kh*kw "
        "(one code per kernel)")
    linear_subvector: int = Field(4, ge=1, description="sub-vector length for Linear and 1x1 "
                                  "convs")
    codebook_bits: int = Field(8, ge=1, le=12, description="2^bits centroids per codebook")
    layer_bits: dict[str, int] = Field(default_factory=dict,
                                       description="{layer: bits} overriding codebook_bits")
    min_share: int | None = Field(
        None, ge=1, description="at least this many sub-vectors per centroid: a small layer "
        "gets fewer bits (down to 2), so its codebook does not outweigh its codes")
    codebook: Literal["layer", "subspace"] = Field(
        "layer", description="one codebook per layer, or one per column block (classic PQ)")
    codebook_dtype: Literal["float16", "float32"] = Field(
        "float16", description="how codebooks are stored (float16: half the codebook bytes, "
        "~1e-3 relative rounding)")
    weighted: bool = Field(False, description="cluster under the layer's input statistics "
                           "from calibration data (the output error, as in 'And the Bit Goes "
                           "Down')")
    calibration_samples: int = Field(256, ge=1)
    iterations: int = Field(30, ge=1, description="k-means iterations")
    ignore: list[str] = Field(default_factory=list, description="layers left dense")

    @field_validator("subvector")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"subvector must be a positive integer or 'kernel', got {v}")
        return v

    @field_validator("layer_bits")
    @classmethod
    def _bits_range(cls, v):
        bad = {k: b for k, b in v.items() if not 1 <= b <= 12}
        if bad:
            raise ValueError(f"layer_bits must be 1..12, got {bad}")
        return v


# ----------------------------------------------------------------------------- modules


class _PQBase(nn.Module):
    """Codes + codebook -> weight. ``codebook``: (books, K, d) learned centroids; ``codes``:
    (out, m) indices, one per sub-vector; with ``zero_code`` index 0 is a fixed zero vector and
    the learned centroids are 1..K."""

    structure_fixed_by = "share.pq"  # lighten.graph refuses channel surgery on coded layers

    def _init_pq(self, weight_shape, subvector: int, books: int, centroids: int,
                 zero_code: bool, codebook_dtype: str, bias: bool) -> None:
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.subvector, self.books, self.centroids = int(subvector), int(books), int(centroids)
        self.zero_code, self.codebook_dtype = bool(zero_code), str(codebook_dtype)
        out, per_row = self.weight_shape[0], math.prod(self.weight_shape[1:])
        # float32 in memory, whatever the storage precision: a later fine-tune (distill,
        # another step's finetune:) trains it like any weight; float16 codebooks hold values
        # rounded to float16, which the artifact stores in two bytes each, losslessly
        self.codebook = nn.Parameter(torch.zeros(books, centroids, subvector))
        codes_dtype = torch.uint8 if centroids + zero_code <= 256 else torch.int16
        self.register_buffer("codes", torch.zeros(out, per_row // subvector, dtype=codes_dtype))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def _pq_config(self) -> dict:
        return {"weight_shape": list(self.weight_shape), "subvector": self.subvector,
                "books": self.books, "centroids": self.centroids, "zero_code": self.zero_code,
                "codebook_dtype": self.codebook_dtype, "bias": self.bias is not None}

    def reconstruct(self) -> torch.Tensor:
        """The dense weight the codes stand for (a Gather in the ONNX graph)."""
        book = self.codebook.float()  # (books, K, d)
        if self.zero_code:
            book = F.pad(book, (0, 0, 1, 0))  # index 0: the zero vector, never trained
        size = book.shape[1]
        # int32 indices: the exporter folds this cast into the ONNX file's Gather indices,
        # which then cost 4 bytes per code instead of int64's 8
        index = self.codes.to(torch.int32)  # (out, m)
        if self.books > 1:  # sub-space j reads codebook j
            index = index + torch.arange(index.shape[1], device=index.device,
                                         dtype=torch.int32) * size
        rows = F.embedding(index, book.reshape(-1, self.subvector))  # (out, m, d)
        return rows.reshape(self.weight_shape)

    def code_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.centroids + self.zero_code)))

    def extra_repr(self) -> str:
        return (f"weight={tuple(self.weight_shape)}, subvector={self.subvector}, "
                f"codebooks={self.books}x{self.centroids}, zero_code={self.zero_code}")


@register_module_type
class PQLinear(_PQBase):
    """A Linear whose weight is stored as product-quantization codes."""

    def __init__(self, weight_shape, subvector: int, books: int, centroids: int,
                 zero_code: bool = False, codebook_dtype: str = "float16", bias: bool = True):
        super().__init__()
        self._init_pq(weight_shape, subvector, books, centroids, zero_code, codebook_dtype, bias)
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.reconstruct(), self.bias)

    def artifact_config(self) -> dict:
        return self._pq_config()

    @classmethod
    def from_artifact(cls, config: dict) -> PQLinear:
        return cls(**config)


@register_module_type
class PQConv2d(_PQBase):
    """A Conv2d (zero padding) whose weight is stored as product-quantization codes."""

    def __init__(self, weight_shape, subvector: int, books: int, centroids: int,
                 zero_code: bool = False, codebook_dtype: str = "float16", bias: bool = True,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
        super().__init__()
        self._init_pq(weight_shape, subvector, books, centroids, zero_code, codebook_dtype, bias)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.groups = int(groups)
        self.out_channels = self.weight_shape[0]
        self.in_channels = self.weight_shape[1] * self.groups
        self.kernel_size = tuple(self.weight_shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.reconstruct(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def artifact_config(self) -> dict:
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {**self._pq_config(), "stride": list(self.stride), "padding": padding,
                "dilation": list(self.dilation), "groups": self.groups}

    @classmethod
    def from_artifact(cls, config: dict) -> PQConv2d:
        return cls(**config)


# ----------------------------------------------------------------------------- k-means


def kmeans(x: torch.Tensor, k: int, *, iterations: int = 30, seed: int = 0,
           space: torch.Tensor | None = None, metric: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding: ``x`` (n, d) -> (centroids (k, d), assign (n,)).

    With ``metric`` (S, d, d) and ``space`` (n,) the distance of point i is the quadratic form
    of ``metric[space[i]]`` and each centroid is the metric-weighted mean
    ``(sum H_i)^-1 sum H_i x_i``; without, plain squared Euclidean distance."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    n, d = x.shape
    if k >= n:
        raise ValueError(f"k-means needs more points ({n}) than centroids ({k})")
    centroids = _plus_plus(x, k, g)
    if metric is not None:
        metric = metric.double()
        ridge = 1e-6 * metric.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-12)
        metric = metric + ridge * torch.eye(d, dtype=metric.dtype)
    assign = torch.zeros(n, dtype=torch.long)
    for i in range(iterations):
        dist = _distances(x, centroids, space, metric)  # (n, k)
        new = dist.argmin(1)
        if i and torch.equal(new, assign):
            break
        assign = new
        centroids = _update(x, assign, k, centroids, dist, space, metric)
    return centroids.float(), assign


def _plus_plus(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), deterministic for a generator."""
    n = len(x)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    closest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: pick any not chosen yet
            left = torch.ones(n, dtype=torch.bool)
            left[chosen] = False
            idx = int(left.nonzero()[0])
        else:
            idx = int(torch.multinomial(closest / total, 1, generator=g))
        chosen.append(idx)
        closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(1))
    return x[chosen].clone()


def _distances(x, centroids, space, metric) -> torch.Tensor:
    if metric is None:
        return torch.cdist(x, centroids) ** 2
    dist = torch.empty(len(x), len(centroids), dtype=x.dtype)
    for s in range(len(metric)):
        rows = space == s
        if not rows.any():
            continue
        h = metric[s]
        xs = x[rows]
        xh = xs @ h  # (n_s, d)
        cc = torch.einsum("kd,de,ke->k", centroids, h, centroids)
        dist[rows] = (xh * xs).sum(1, keepdim=True) - 2 * xh @ centroids.T + cc
    return dist


def _update(x, assign, k, old, dist, space, metric) -> torch.Tensor:
    """New centroids; an empty cluster takes the point farthest from its centroid."""
    counts = torch.bincount(assign, minlength=k)
    if metric is None:
        sums = torch.zeros_like(old).index_add_(0, assign, x)
        new = sums / counts.clamp_min(1)[:, None]
    else:
        s_count = torch.zeros(len(metric), k, dtype=x.dtype)
        s_count.index_put_((space, assign), torch.ones(len(x), dtype=x.dtype), accumulate=True)
        s_sum = torch.zeros(len(metric), k, x.shape[1], dtype=x.dtype)
        s_sum.index_put_((space, assign), x, accumulate=True)
        a = torch.einsum("sk,sde->kde", s_count, metric)
        b = torch.einsum("sde,ske->kd", metric, s_sum)
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        a = torch.where((counts > 0)[:, None, None], a, eye)
        new = torch.linalg.solve(a, b)
    new = torch.where((counts > 0)[:, None], new, old)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        far = dist.gather(1, assign[:, None]).flatten().argsort(descending=True)
        new[empty] = x[far[: len(empty)]]
    return new


# ----------------------------------------------------------------------------- the library call


def _subvector(layer: nn.Module, config: PQConfig) -> int:
    if isinstance(layer, nn.Conv2d) and math.prod(layer.kernel_size) > 1:
        return (math.prod(layer.kernel_size) if config.subvector == "kernel"
                else int(config.subvector))
    return config.linear_subvector


def _why_not(layer: nn.Module, d: int, bits: int, books: str) -> str | None:
    """Why ``layer`` stays dense (None: it is product-quantized)."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            return f"padding_mode {layer.padding_mode!r} (only zero padding)"
        if layer.groups != 1:
            return f"grouped conv (groups={layer.groups})"
    per_row = math.prod(layer.weight.shape[1:])
    if per_row % d:
        return f"a row of {per_row} weights does not split into sub-vectors of {d}"
    n_sub = layer.weight.shape[0] * (per_row // d if books == "layer" else 1)
    if n_sub <= 2 ** bits:
        return f"only {n_sub} sub-vectors per codebook for {2 ** bits} centroids"
    return None


def _bits(name: str, layer: nn.Module, config: PQConfig) -> int:
    """Code bits of ``layer``: ``layer_bits``, else ``codebook_bits`` capped by ``min_share``."""
    if name in config.layer_bits:
        return config.layer_bits[name]
    bits = config.codebook_bits
    if config.min_share:
        d = _subvector(layer, config)
        n_sub = layer.weight.numel() // d // (1 if config.codebook == "layer" else
                                              max(math.prod(layer.weight.shape[1:]) // d, 1))
        bits = min(bits, max(2, int(math.log2(max(n_sub // config.min_share, 1)))))
    return bits


def _books(layer: nn.Module, d: int, config: PQConfig) -> int:
    return 1 if config.codebook == "layer" else math.prod(layer.weight.shape[1:]) // d


def _pq_bytes(layer: nn.Module, d: int, bits: int, books: int, dtype_bytes: int) -> int:
    n_sub = layer.weight.numel() // d
    return math.ceil(n_sub * bits / 8) + books * 2 ** bits * d * dtype_bytes


def _input_metrics(model: nn.Module, layers: dict[str, nn.Module], d: dict[str, int],
                   batches: Iterable) -> dict[str, torch.Tensor]:
    """Per layer (m, d, d): the Gram matrix of each sub-space's inputs, averaged over rows."""
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def collect(module, args, _output):
            x = args[0].detach().float()
            if isinstance(module, nn.Conv2d):  # (N, C*kh*kw, L) patches, weight-row order
                x = F.unfold(x, module.kernel_size, module.dilation, module.padding,
                             module.stride).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1])
            blocks = x.reshape(len(x), -1, d[name]).transpose(0, 1)  # (m, N, d)
            gram = blocks.transpose(1, 2).double() @ blocks.double()
            grams[name] = grams.get(name, 0) + gram
            rows[name] = rows.get(name, 0) + len(x)
        return collect

    forward_batches_with_hooks(model, batches,
                               [(layer, hook(name)) for name, layer in layers.items()])
    return {name: grams[name] / max(rows[name], 1) for name in grams}


def _encode_layer(w: torch.Tensor, d: int, bits: int, books: int, *, iterations: int,
                  seed: int, metric: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                   bool]:
    """(codebook (books, K, d), codes (out, m), zero_code) for weight ``w``."""
    out = w.shape[0]
    sub = w.detach().reshape(out, -1, d).float()  # (out, m, d)
    m = sub.shape[1]
    zero = (sub == 0).all(-1)  # pruned sub-vectors
    zero_code = bool(zero.any())
    k = 2 ** bits - zero_code
    codes = torch.zeros(out, m, dtype=torch.long)
    codebook = torch.zeros(books, k, d)
    for b in range(books):
        cols = slice(None) if books == 1 else slice(b, b + 1)
        keep = ~zero[:, cols]
        points = sub[:, cols][keep]  # (n, d)
        space = torch.arange(m).expand(out, m)[:, cols][keep]
        if len(points) <= k:  # a sub-space with few live sub-vectors: each its own centroid
            centroids = torch.zeros(k, d)
            centroids[: len(points)] = points
            assign = torch.arange(len(points))
        else:
            h = None if metric is None else (metric if books == 1 else metric[b:b + 1])
            centroids, assign = kmeans(points, k, iterations=iterations, seed=seed + b,
                                       space=space if books == 1 else torch.zeros_like(space),
                                       metric=h)
        block = codes[:, cols]
        block[keep] = assign + zero_code
        codes[:, cols] = block
        codebook[b] = centroids
    return codebook, codes, zero_code


def product_quantize_(model: nn.Module, config: PQConfig, *, batches: Iterable | None = None,
                      seed: int = 0, notes: list[str] | None = None) -> list[dict]:
    """Replace every eligible Conv2d / Linear of ``model`` (in place) by its PQ module; returns
    one row per layer considered. ``batches``: calibration inputs (``weighted: true``)."""
    require_modules(model, [*config.ignore, *config.layer_bits], key="share.pq")
    notes = notes if notes is not None else []
    targets: dict[str, nn.Module] = {}
    plan: dict[str, tuple[int, int]] = {}
    rows: list[dict] = []
    dtype_bytes = 2 if config.codebook_dtype == "float16" else 4
    for name, layer in model.named_modules(remove_duplicate=False):  # a shared module: each path
        if type(layer) not in (nn.Conv2d, nn.Linear) or name in config.ignore:
            continue
        d, bits = _subvector(layer, config), _bits(name, layer, config)
        why = _why_not(layer, d, bits, config.codebook)
        books = _books(layer, d, config)
        dense = layer.weight.numel() * layer.weight.element_size()
        if why is None and _pq_bytes(layer, d, bits, books, dtype_bytes) >= dense:
            why = (f"codes + codebook ({_pq_bytes(layer, d, bits, books, dtype_bytes)} B) "
                   f"not smaller than the dense weight ({dense} B)")
        if why is not None:
            notes.append(f"{name} left dense: {why}")
            rows.append({"module": name, "action": "keep", "before": "float32",
                         "after": "float32", "reason": why})
            continue
        targets[name], plan[name] = layer, (d, bits)
    if not targets:
        raise UnsupportedError("share.pq found no Conv2d/Linear layer to product-quantize "
                               "(all ignored, too small, or already replaced); "
                               + "; ".join(notes[:2]))
    if config.weighted:
        if batches is None:
            raise UnsupportedError("share.pq weighted: true needs calibration inputs; pass "
                                   "batches= (the recipe step takes them from the training set)")
        batches = list(batches)
    quantized: dict[tuple, tuple[str, _PQBase]] = {}  # tied weights -> the one PQ module
    for i, (name, layer) in enumerate(targets.items()):
        d, bits = plan[name]
        books = _books(layer, d, config)
        w = layer.weight.detach()
        key = (id(layer.weight), None if layer.bias is None else id(layer.bias))
        if key in quantized and _same_call(quantized[key][1], layer):
            first, module = quantized[key]  # share.tie'd (or one module at two paths): stays tied
            set_submodule(model, name, module)
            rows.append({"module": name, "action": "share", "type": type(layer).__name__,
                         "before": f"tied to {first}", "after": f"the PQ module of {first}",
                         "bytes_before": 0, "bytes_after": 0})
            continue
        # weighted: this layer's inputs come from the model with every earlier layer already
        # product-quantized, so k-means also absorbs the error those layers pass on (BGD)
        metric = (_input_metrics(model, {name: layer}, {name: d}, batches)[name]
                  if config.weighted else None)
        codebook, codes, zero_code = _encode_layer(
            w, d, bits, books, iterations=config.iterations, seed=seed + 1000 * i,
            metric=metric)
        new = _pq_module(layer, d, books, codebook, codes, zero_code, config.codebook_dtype)
        with torch.no_grad():
            err = float((new.reconstruct() - w).norm() / w.norm().clamp_min(1e-12))
        set_submodule(model, name, new)
        quantized[key] = (name, new)
        pq_bytes = _pq_bytes(layer, d, bits, books, dtype_bytes)
        rows.append({"module": name, "action": "share", "type": type(layer).__name__,
                     "before": f"{w.numel()} float32",
                     "after": f"{codes.numel()} x {bits}-bit codes, {books}x{2 ** bits}x{d} book",
                     "weight_bits": round(8 * pq_bytes / w.numel(), 3), "subvector": d,
                     "codebook_bits": bits, "relative_error": round(err, 5),
                     "bytes_before": w.numel() * w.element_size(), "bytes_after": pq_bytes})
    return rows


def _same_call(module: _PQBase, layer: nn.Module) -> bool:
    """``layer`` (sharing ``module``'s weight) computes as ``module`` does."""
    if isinstance(layer, nn.Linear):
        return isinstance(module, PQLinear)
    return isinstance(module, PQConv2d) and (
        tuple(layer.stride), layer.padding if isinstance(layer.padding, str)
        else tuple(layer.padding), tuple(layer.dilation), layer.groups) == (
        module.stride, module.padding, module.dilation, module.groups)


def _pq_module(layer, d, books, codebook, codes, zero_code, dtype) -> _PQBase:
    common = {"weight_shape": list(layer.weight.shape), "subvector": d, "books": books,
              "centroids": codebook.shape[1], "zero_code": zero_code,
              "codebook_dtype": "float32", "bias": layer.bias is not None}
    if isinstance(layer, nn.Conv2d):
        new = PQConv2d(**common, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation, groups=layer.groups)
    else:
        new = PQLinear(**common)
    with torch.no_grad():
        new.codebook.copy_(codebook)
        new.codes.copy_(codes.to(new.codes.dtype))
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    new.codebook_dtype = dtype  # rounded to it when fine-tuning ends (store_codebooks_)
    return new.to(layer.weight.device).train(layer.training)


def store_codebooks_(model: nn.Module) -> None:
    """Round every PQ codebook to its storage precision (after fine-tuning): float16 values in
    a float32 parameter, which the artifact stores as float16 without loss."""
    for module in model.modules():
        if isinstance(module, _PQBase):
            dtype = _DTYPES[module.codebook_dtype]
            with torch.no_grad():
                module.codebook.copy_(module.codebook.to(dtype).float())


@register_step("share.pq", PQConfig,
               needs_data=lambda c: "calibration inputs" if c.weighted else None)
def share_pq(model: nn.Module, config: PQConfig, ctx: StepContext) -> nn.Module:
    """Product quantization: weight sub-vectors stored as codes into per-layer codebooks."""
    rows = product_quantize_(
        model, config, seed=ctx.seed, notes=ctx.notes,
        batches=ctx.calibration_batches(config.calibration_samples) if config.weighted else None)
    for row in rows:
        ctx.layer(**row)
    done = [r for r in rows if r["action"] == "share"]
    before = sum(r["bytes_before"] for r in done)
    after = sum(r["bytes_after"] for r in done)
    ctx.note(f"share.pq: {len(done)} layers to codes + codebooks, their weights {before} B -> "
             f"{after} B ({before / max(after, 1):.1f}x smaller)")
    ctx.finetune(model, config.finetune)  # codes fixed; codebooks (and the rest) trained
    store_codebooks_(model)
    ctx.summary.update(pq_layers=len(done), pq_weight_bytes_before=before,
                       pq_weight_bytes_after=after)
    return model
