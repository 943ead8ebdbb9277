"""``arch.separable``: k x k convolutions -> depthwise k x k + pointwise 1 x 1.

A full conv has ``k^2 * C_in * C_out`` weights; the pair has ``k^2 * C_in + C_in * C_out``
(ResNet-20's 64-channel 3x3 conv: 36,864 -> 4,672). The pair computes
``W[o, i] = P[o, i] * D[i]``: one spatial filter per input channel, mixed per output channel.

**Initialisation.** For each input channel ``i`` the slice ``W[:, i]`` reshaped to
``(C_out, k*k)`` is approximated by the rank-1 matrix ``P[:, i] D[i]^T``; the best such fit in
the Frobenius norm (Eckart-Young) is the top singular pair of that slice, split as
``sqrt(s) u`` and ``sqrt(s) v``. Input channels are independent, so this is the best fit of the
whole kernel in that form (``fit_error`` per layer). Weight space ignores the data, so with
``calibration_samples`` (default 256 training inputs) the pointwise weights are then refitted by
least squares on the layer's outputs, layer after layer in forward order: each pair is fitted
to reproduce the *original* conv's output from the input it receives *after* the earlier
layers were replaced, so it also absorbs their error (:func:`refit_sequential`: two forward
passes in all; ``output_error`` per layer). On the shipped Fashion-MNIST ResNet-20 (18 convs
replaced, 1,000 test images, no fine-tuning) the SVD fit alone kept 9.5% accuracy,
independent per-layer refits 60.2%, the sequential refit 88.8% (baseline 93.3%). It is a start,
not an equivalent: the step then recovers accuracy with ``finetune:`` (``distill:`` from the
baseline).

**Which layers.** ``layers: auto`` takes every ``Conv2d`` with ``groups=1``, a kernel larger
than 1 and at least :data:`MIN_IN_CHANNELS` input channels (a 1-3 channel stem would be left
with one shared filter per input channel), then keeps a replacement only where the deployment
backend runs it faster: the original layer and the pair are exported alone at the layer's input
shape and timed together in interleaved rounds (``measure_latency: false`` skips the timing and
keeps every candidate, e.g. in tests or to trade speed for parameters). A list of names takes
exactly those layers (each must be such a conv). ``target_params: 0.33`` then replaces only as
many as bring the whole model to a third of its parameters, those saving most first
(:func:`_keep_dense_within`): the wide late layers hold the parameters, the early ones the
MACs, so fewer layers change and less accuracy has to be recovered.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lighten.errors import UnsupportedError
from lighten.modules import require_modules, set_submodule
from lighten.registry import register_step
from lighten.step import PruneFinetuneConfig, StepConfig, StepContext

__all__ = ["LayerChoice", "SeparableConfig", "separable_pair", "separable_"]

MIN_IN_CHANNELS = 4
BATCH = 64  # the batch the choice is timed at (the stage table's b64 column)
RUNS = 20


class SeparableConfig(StepConfig):
    layers: Literal["auto"] | list[str] = Field("auto", description="auto, or conv names")
    measure_latency: bool = Field(True, description="keep a pair only where it runs faster on "
                                  "the deployment backend")
    calibration_samples: int = Field(256, ge=0, description="training inputs the pointwise "
                                     "weights are refitted on (least squares on the layer's "
                                     "outputs); 0: the weight-only SVD fit")
    target_params: float | None = Field(None, gt=0, lt=1, description="replace only until "
                                        "the model has at most this fraction of its parameters "
                                        "(0.33: 3x fewer), the layers that save most first; "
                                        "the rest stay dense")
    ignore: list[str] = Field(default_factory=list, description="modules left alone")
    # replacing layers is re-training, like pruning: the pruning steps' fine-tune defaults
    finetune: PruneFinetuneConfig | None = None


@dataclass
class LayerChoice:
    name: str
    replaced: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    fit_error: float  # relative Frobenius error of the rank-1 initialisation
    output_error: float | None = None  # relative error of the layer's outputs on data
    ms_before: float | None = None
    ms_after: float | None = None
    reason: str | None = None


def _eligible(m: nn.Module) -> str | None:
    """Why ``m`` cannot become a separable pair, or None when it can."""
    if type(m) is not nn.Conv2d:
        return f"{type(m).__name__} is not a Conv2d"
    if m.groups != 1:
        return f"already grouped (groups={m.groups})"
    if all(k == 1 for k in m.kernel_size):
        return "1x1 kernel: already pointwise"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    return None


@torch.no_grad()
def separable_pair(conv: nn.Conv2d) -> tuple[nn.Sequential, float]:
    """(``Sequential(depthwise, pointwise)`` initialised from the best per-input-channel rank-1
    fit of ``conv``'s kernel, relative error of that fit)."""
    w = conv.weight.double()  # (out, in, kh, kw)
    cout, cin = w.shape[:2]
    slices = w.permute(1, 0, 2, 3).reshape(cin, cout, -1)  # (in, out, k*k)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    root = s[:, :1].sqrt()  # (in, 1)
    p = u[:, :, 0] * root  # (in, out)
    d = vh[:, 0, :] * root  # (in, k*k)
    approx = torch.einsum("io,ik->iok", p, d)
    error = float((approx - slices).norm() / slices.norm().clamp_min(1e-30))
    dw = nn.Conv2d(cin, cin, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=cin, bias=False)
    pw = nn.Conv2d(cin, cout, 1, bias=conv.bias is not None)
    dw.weight.copy_(d.reshape(cin, 1, *conv.kernel_size).to(conv.weight.dtype))
    pw.weight.copy_(p.t().reshape(cout, cin, 1, 1).to(conv.weight.dtype))
    if conv.bias is not None:
        pw.bias.copy_(conv.bias)
    return nn.Sequential(dw, pw).to(conv.weight.device), error


MAX_ROWS = 65536  # output positions the least-squares refit uses per layer


@torch.no_grad()
def _solve_pointwise(pair: nn.Sequential, zs: torch.Tensor, ys: torch.Tensor
                     ) -> tuple[float, float]:
    """Least-squares pointwise weights of ``pair`` from depthwise outputs ``zs`` (rows,
    C_in) to targets ``ys`` (rows, C_out, bias removed); kept only when they fit better.
    Returns the relative error (before, after)."""
    zs, ys = zs.double(), ys.double()
    old = pair[1].weight.double().flatten(1).t()  # (C_in, C_out)
    gram = zs.t() @ zs
    ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
    new = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), zs.t() @ ys)
    norm = ys.norm().clamp_min(1e-30)
    before = float((zs @ old - ys).norm() / norm)
    after = float((zs @ new - ys).norm() / norm)
    if after < before:
        pair[1].weight.copy_(new.t().reshape_as(pair[1].weight).to(pair[1].weight.dtype))
    return before, min(before, after)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C): one row per output position."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _pick(n: int) -> torch.Tensor | None:
    """The seeded subset of ``n`` positions the refit uses, None for all of them."""
    if n <= MAX_ROWS:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:MAX_ROWS]


@torch.no_grad()
def refit_pointwise(conv: nn.Conv2d, pair: nn.Sequential, x: torch.Tensor, *,
                    target_input: torch.Tensor | None = None) -> tuple[float, float]:
    """Refit ``pair``'s pointwise weights (in place) so that ``pair(x)`` matches
    ``conv(target_input)`` (default ``x``) in least squares, the depthwise filters fixed: a
    linear regression of the conv's outputs on the depthwise outputs, one per output channel.
    Unlike the weight-space fit it weighs input channels by how the data excites them, and
    with ``target_input`` (what the layer received in the original model, ``x`` being what it
    receives after earlier layers were replaced) it also absorbs those layers' error.
    Returns the relative output error (before, after); the refit is kept only when lower."""
    target = conv(x if target_input is None else target_input)
    if conv.bias is not None:
        target = target - conv.bias.reshape(1, -1, 1, 1)
    zs, ys = _rows(pair[0](x)), _rows(target)
    pick = _pick(len(zs))
    if pick is not None:
        zs, ys = zs[pick], ys[pick]
    return _solve_pointwise(pair, zs, ys)


def _concat(batches) -> tuple[torch.Tensor, ...]:
    """Calibration batches (tensors or ``Inputs`` tuples) as one ``model(*inputs)`` batch."""
    parts = [b if isinstance(b, tuple) else (b,) for b in batches]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


@torch.no_grad()
def refit_sequential(model: nn.Module, pairs: dict[str, nn.Sequential], batches
                     ) -> dict[str, float]:
    """Put every ``pairs[name]`` in place of conv ``name`` of ``model`` and refit its pointwise
    weights in forward order, each to reproduce the original conv's output from the input it
    receives once the earlier pairs run: two forward passes in all. Pass 1 records each conv's
    output on the calibration inputs (a seeded subset of at most :data:`MAX_ROWS` positions);
    pass 2 runs the model with the pairs swapped in, each refitted by a pre-hook on the input
    arriving there, so every later layer already sees the refitted earlier ones. (Re-running
    the model per layer, as a first version did, cost 2 x 18 full passes on ResNet-20.) Eval
    mode (BatchNorm statistics untouched); a conv called twice is fitted on its first call.
    Returns the relative output error per name."""
    inputs = _concat(batches)
    targets: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    errors: dict[str, float] = {}

    def record(name):
        def hook(conv, args, out):
            if name not in targets:
                ys = _rows(out if conv.bias is None else out - conv.bias.reshape(1, -1, 1, 1))
                pick = _pick(len(ys))
                targets[name] = (pick, ys if pick is None else ys[pick])
        return hook

    def refit(name):
        def hook(pair, args):
            if name not in errors:
                pick, ys = targets[name]
                zs = _rows(pair[0](args[0]))
                errors[name] = _solve_pointwise(pair, zs if pick is None else zs[pick], ys)[1]
        return hook

    def run(hooks) -> None:
        try:
            model(*inputs)
        finally:
            for h in hooks:
                h.remove()

    was_training = model.training
    model.eval()
    try:
        run([model.get_submodule(n).register_forward_hook(record(n)) for n in pairs])
        for name, pair in pairs.items():
            set_submodule(model, name, pair.train(False))
        run([pair.register_forward_pre_hook(refit(n)) for n, pair in pairs.items()])
    finally:
        model.train(was_training)
    return errors


def _input_shapes(model: nn.Module, inputs, names) -> dict[str, tuple[int, ...]]:
    """Input shape (batch 1 dropped) of each named module, from one eval-mode forward pass
    (BatchNorm statistics untouched)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name):
        def record(module, args) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _macs(m: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        out = m(torch.zeros(1, *shape))
    positions = out.shape[2] * out.shape[3]
    total = 0
    for c in ([m] if isinstance(m, nn.Conv2d) else m):
        total += positions * c.out_channels * (c.in_channels // c.groups) * \
            c.kernel_size[0] * c.kernel_size[1]
    return total


def time_pairs(pairs: list[tuple[nn.Module, nn.Module, tuple[int, ...]]], *, backend: str,
               threads: int | None, runs: int = RUNS, batch: int = BATCH
               ) -> list[tuple[float, float]]:
    """(ms before, ms after) per (original, replacement, input shape), timed together on
    ``backend`` in interleaved rounds (:func:`lighten.measure.timing.time_interleaved`)."""
    from lighten.backends import get_backend
    from lighten.export import export_onnx
    from lighten.measure.timing import time_interleaved

    be = get_backend(backend, threads=threads)
    compiled = []
    with tempfile.TemporaryDirectory(prefix="lighten-separable-") as tmp:
        for i, (a, b, shape) in enumerate(pairs):
            for tag, m in (("a", a), ("b", b)):
                work = Path(tmp) / f"{i}{tag}"
                work.mkdir()
                export_onnx(copy.deepcopy(m).eval(), work / "model.onnx", input_shape=shape,
                            verify=False)
                loaded = be.load(work, input_shape=shape)
                if loaded is None:
                    raise UnsupportedError(f"arch.separable measure_latency: the {backend} "
                                           "backend cannot time ONNX files; set "
                                           "measure_latency: false or deploy on onnxruntime")
                compiled.append(loaded)
        stats = time_interleaved(compiled, runs=runs, batches=(batch,)).stats[batch]
    return [(stats[2 * k].median, stats[2 * k + 1].median) for k in range(len(pairs))]


def _keep_dense_within(choices: list[LayerChoice], total: int, target: float) -> None:
    """Un-choose replacements (in place) until the fewest that bring the model to at most
    ``target`` x its ``total`` parameters are left, taking the largest parameter savings first
    (on ResNet-20 the wide last-stage convs: most parameters, fewest positions, so the early
    high-resolution layers, cheap in parameters, keep their full kernels)."""
    now, budget = total, target * total
    for c in sorted((c for c in choices if c.replaced),
                    key=lambda c: c.params_after - c.params_before):  # most saved first
        if now <= budget:
            c.replaced = False
            c.reason = (f"not needed for target_params {target:g}: the model is at "
                        f"{now / total:.3f} of its parameters without it")
        else:
            now -= c.params_before - c.params_after


def separable_(model: nn.Module, inputs, config: SeparableConfig | None = None, *,
               backend: str = "onnxruntime", threads: int | None = None,
               batches=None) -> list[LayerChoice]:
    """Replace the chosen convs of ``model`` in place; one :class:`LayerChoice` per candidate.
    ``inputs``: one ``model(*inputs)`` batch (layer shapes); ``batches``: calibration inputs
    the pointwise weights are refitted on (:func:`refit_pointwise`), or None."""
    config = config or SeparableConfig()
    require_modules(model, config.ignore, key="arch.separable ignore")
    modules = dict(model.named_modules())
    if config.layers == "auto":
        names = [n for n, m in modules.items() if n and _eligible(m) is None
                 and not any(n == s or n.startswith(s + ".") for s in config.ignore)]
    else:
        require_modules(model, config.layers, key="arch.separable layers")
        names = list(config.layers)
        for n in names:
            why = _eligible(modules[n])
            if why:
                raise UnsupportedError(f"arch.separable layers: {n!r} cannot be made separable "
                                       f"({why}); list k x k Conv2d layers with groups=1")
    shapes = _input_shapes(model, inputs, names)
    choices, pairs = [], []
    for n in names:
        conv = modules[n]
        if n not in shapes:
            continue  # never called: nothing to gain
        pair, error = separable_pair(conv)
        p0, p1 = sum(p.numel() for p in conv.parameters()), sum(p.numel()
                                                                for p in pair.parameters())
        choice = LayerChoice(n, True, p0, p1, _macs(conv, shapes[n]), _macs(pair, shapes[n]),
                             error)
        if config.layers == "auto" and conv.in_channels < MIN_IN_CHANNELS:
            choice.replaced = False
            choice.reason = (f"{conv.in_channels} input channel(s): the pair would keep one "
                             f"filter per input channel (auto needs >= {MIN_IN_CHANNELS})")
        choices.append(choice)
        pairs.append(pair)
    if config.measure_latency and choices:
        timed = [(modules[c.name], pair, shapes[c.name])
                 for c, pair in zip(choices, pairs, strict=True)]
        for c, (before, after) in zip(choices, time_pairs(timed, backend=backend,
                                                          threads=threads), strict=True):
            c.ms_before, c.ms_after = before, after
            if c.replaced and after >= before and config.layers == "auto":
                c.replaced = False
                c.reason = f"not faster on {backend}: {after:.3g} vs {before:.3g} ms"
    if config.target_params is not None:
        _keep_dense_within(choices, sum(p.numel() for p in model.parameters()),
                           config.target_params)
    chosen = {c.name: pair for c, pair in zip(choices, pairs, strict=True) if c.replaced}
    if batches is not None and chosen:  # fit to what each layer receives after earlier pairs
        errors = refit_sequential(model, chosen, list(batches))
        for c in choices:
            c.output_error = errors.get(c.name)
    else:
        for name, pair in chosen.items():
            set_submodule(model, name, pair)
    return choices


@register_step("arch.separable", SeparableConfig,
               needs_data=lambda c: "example inputs (each layer's input shape)"
               + (" and calibration inputs" if c.calibration_samples else ""))
def arch_separable(model: nn.Module, config: SeparableConfig, ctx: StepContext) -> nn.Module:
    """Replace k x k convs by depthwise + pointwise pairs (rank-1 fit), then fine-tune."""
    from lighten.measure import count_macs

    example = ctx.example_inputs(1)
    macs_before = count_macs(model, example)
    params_before = sum(p.numel() for p in model.parameters())
    batches = (list(ctx.calibration_batches(config.calibration_samples))
               if config.calibration_samples else None)
    choices = separable_(model, example, config, backend=ctx.target.backend,
                         threads=ctx.target.threads, batches=batches)
    for c in choices:
        row = dict(before=f"{c.params_before} params, {c.macs_before} MACs",
                   after=(f"{c.params_after} params, {c.macs_after} MACs" if c.replaced
                          else "kept"),
                   params_before=c.params_before,
                   params=c.params_after if c.replaced else c.params_before,
                   macs_before=c.macs_before,
                   macs=c.macs_after if c.replaced else c.macs_before,
                   fit_error=round(c.fit_error, 4), reason=c.reason)
        if c.output_error is not None:
            row["output_error"] = round(c.output_error, 4)
        if c.ms_before is not None:
            row.update(latency_ms_before=c.ms_before, latency_ms_after=c.ms_after)
            row["after"] += f", {c.ms_after:.3g} vs {c.ms_before:.3g} ms"
        ctx.layer(c.name, "separable" if c.replaced else "keep", **row)
    done = [c for c in choices if c.replaced]
    if not choices:
        ctx.note("arch.separable: no layer replaced: the model has no k x k Conv2d with "
                 "groups=1 that runs in its forward")
    elif not done:
        ctx.note(f"arch.separable: no layer replaced (of {len(choices)} candidates; see the "
                 "reasons per layer)")
    else:
        ctx.note(f"arch.separable: {len(done)} of {len(choices)} conv(s) -> depthwise + "
                 f"pointwise; params {sum(c.params_before for c in done)} -> "
                 f"{sum(c.params_after for c in done)} in those layers")
    params_after = sum(p.numel() for p in model.parameters())
    if config.target_params is not None and params_after > config.target_params * params_before:
        ctx.note(f"arch.separable: target_params {config.target_params:g} not reached: "
                 f"{params_after / params_before:.3f} of the parameters with every eligible "
                 "conv replaced (see the reasons of the kept ones)")
    ctx.summary.update(macs_before=macs_before, macs_after=count_macs(model, example),
                       params_before=params_before, params_after=params_after,
                       replaced=len(done))
    return ctx.finetune(model, config.finetune)
