"""What the three low-rank steps share: finding the layers and their input shapes, counting
MACs, the latency check on the deployment backend, applying the replacements and the rows.

A step proposes a replacement per layer (:class:`Proposal`: a ``nn.Sequential`` of standard
torch layers, so the artifact's edit log rebuilds it without custom code); this module then

1. drops proposals that do not cut the layer's MACs (counted at the layer's real input shape,
   captured with a forward hook on the task's example input);
2. with ``measure_latency`` (default on), exports the original layer and its replacement alone
   at that input shape to the deployment backend (``deploy: backend``) and times them together
   in interleaved rounds (:func:`lighten.measure.timing.time_interleaved`); a replacement is
   kept only where its time, divided by the original's in the same round, has a median below 1;
3. puts the kept replacements in the model, one row per layer (rank, MACs, ms, error, kept or
   reverted) in the step's report, and fine-tunes when ``finetune:`` is set.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from lighten.errors import ModelError, UnsupportedError
from lighten.hooks import forward_with_hooks
from lighten.step import StepConfig, StepContext

RUNS = 30  # timed runs per form and layer, spread over interleaved rounds


class LowRankConfig(StepConfig):
    """Keys every ``lowrank.*`` step takes."""

    ignore: list[str] = Field(default_factory=list, description="module names (or their "
                              "parents) left as they are")
    measure_latency: bool = Field(True, description="time each layer and its replacement on "
                                  "the deployment backend and keep the replacement only where "
                                  "it is faster; false: decide by MACs alone (fast, for tests)")
    latency_batch: int = Field(64, ge=1, description="batch size the latency check times at")


@dataclass
class Site:
    """A candidate layer and what it sees on the example input (shapes without the batch)."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int = 1


@dataclass
class Proposal:
    """A layer's replacement: ``module`` computes what the layer computes from a rank-``rank``
    factorization of its weight; ``error`` is the relative Frobenius error of that weight."""

    site: Site
    module: nn.Module
    rank: int | tuple[int, ...]
    error: float
    macs_before: int = 0
    macs_after: int = 0
    ms_before: float | None = None
    ms_after: float | None = None
    kept: bool = False
    reason: str = ""
    extra: dict = field(default_factory=dict)


def ignored(name: str, ignore: list[str]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in ignore)


def find_sites(model: nn.Module, example_inputs: tuple[torch.Tensor, ...],
               wanted: Callable[[nn.Module], bool], ignore: list[str]) -> dict[str, Site]:
    """Layers ``wanted`` selects (not ignored, weights not shared) with the input and output
    shapes they get on one forward pass of ``example_inputs``; layers the pass never calls are
    left out (they compute nothing)."""
    from lighten.modules import require_modules

    require_modules(model, ignore, key="ignore")
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    chosen = {n: m for n, m in model.named_modules()
              if n and wanted(m) and not ignored(n, ignore) and not _inside_fused(model, n)
              and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))}
    sites: dict[str, Site] = {}

    def hook(name):
        def record(module, args, output):
            if name in sites:
                sites[name].calls += 1
            elif args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                sites[name] = Site(name, module, tuple(args[0].shape[1:]),
                                   tuple(output.shape[1:]))
        return record

    try:
        forward_with_hooks(model, tuple(example_inputs),
                           [(m, hook(n)) for n, m in chosen.items()])
    except Exception as exc:
        raise ModelError(f"cannot run the model on its example input to find layer shapes: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         ) from exc
    return {n: sites[n] for n in chosen if n in sites}


def positions(shape: tuple[int, ...], channel_axis: int) -> int:
    """Number of positions a layer applies its weight at: every axis but the channel one."""
    dims = [d for i, d in enumerate(shape) if i != channel_axis % len(shape)]
    n = 1
    for d in dims:
        n *= d
    return n


def one_blas_thread():
    """Run numpy's LAPACK on one thread: the decompositions are many small SVDs, for which
    OpenBLAS's threads only spin and wait (16x slower on a busy 2-core machine). threadpoolctl
    comes with scikit-learn."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    w = weight.detach().double()
    return float(torch.linalg.norm(approx.double() - w) / torch.linalg.norm(w).clamp_min(1e-30))


def _compile(backend, module: nn.Module, shape, workdir: Path):
    return backend.compile(copy.deepcopy(module).eval(), input_shape=shape, workdir=workdir)


def time_proposals(proposals: list[Proposal], *, backend_name: str, threads: int | None,
                   batch: int) -> None:
    """Fill ``ms_before`` / ``ms_after`` of each proposal: the layer and its replacement alone on
    the backend at its input shape, all timed together in interleaved rounds; ``kept`` is set
    where the paired ratio (replacement / original, per round) has a median below 1."""
    from lighten.backends import get_backend
    from lighten.measure.timing import paired_ratio, time_interleaved

    if not proposals:
        return
    backend = get_backend(backend_name, threads=threads)
    with tempfile.TemporaryDirectory(prefix="lighten-lowrank-") as tmp:
        compiled = []
        for i, p in enumerate(proposals):
            compiled.append(_compile(backend, p.site.module, p.site.in_shape,
                                     Path(tmp) / f"{i}-layer"))
            compiled.append(_compile(backend, p.module, p.site.in_shape,
                                     Path(tmp) / f"{i}-lowrank"))
        stats = time_interleaved(compiled, runs=RUNS, batches=(batch,)).stats[batch]
    for k, p in enumerate(proposals):
        before, after = stats[2 * k], stats[2 * k + 1]
        p.ms_before, p.ms_after = before.median, after.median
        ratio = paired_ratio(after, before)
        speed = ratio.median if ratio is not None else after.median / max(before.median, 1e-12)
        p.kept = speed < 1.0
        if not p.kept:
            p.reason = (f"not faster on {backend_name}: {after.median:.3g} vs "
                        f"{before.median:.3g} ms at batch {batch}")


def describe(module: nn.Module) -> str:
    """Short text of a layer or a Sequential of layers, for the report's before/after."""
    parts = module if isinstance(module, nn.Sequential) else [module]
    out = []
    for m in parts:
        if isinstance(m, nn.Linear):
            out.append(f"linear {m.in_features}→{m.out_features}")
        elif isinstance(m, nn.Conv2d):
            k = "x".join(str(v) for v in m.kernel_size)
            dw = " dw" if m.groups > 1 and m.groups == m.in_channels else ""
            out.append(f"conv{dw} {k} {m.in_channels}→{m.out_channels}")
        else:
            out.append(type(m).__name__)
    return ", ".join(out)


def apply_proposals(model: nn.Module, proposals: list[Proposal], config: LowRankConfig,
                    ctx: StepContext | None, *, step: str) -> list[Proposal]:
    """Decide (MACs, then latency) and put the kept replacements in ``model``; returns every
    proposal with its decision and writes one report row per layer. MACs are counted by
    :func:`lighten.measure.count_macs` on the layer alone at its input shape."""
    from lighten.measure import count_macs

    for p in proposals:
        p.macs_before = count_macs(p.site.module, p.site.in_shape)
        p.macs_after = count_macs(p.module, p.site.in_shape)
        if p.macs_after >= p.macs_before:
            p.reason = f"rank {_rank_text(p.rank)} saves no MACs"
    cheaper = [p for p in proposals if not p.reason]
    if config.measure_latency and cheaper:
        target = ctx.target if ctx is not None else None
        time_proposals(cheaper, backend_name=target.backend if target else "onnxruntime",
                       threads=target.threads if target else None, batch=config.latency_batch)
    else:
        for p in cheaper:
            p.kept = True
    for p in proposals:
        if p.kept:
            model.set_submodule(p.site.name, p.module)
    if ctx is not None:
        sparse = [p.site.name for p in proposals
                  if p.kept and float((p.site.module.weight == 0).float().mean()) > 0.01]
        if sparse:
            ctx.note(f"{step}: {', '.join(sparse)} held pruned zeros; their factors are dense "
                     "(factorize before pruning, or prune the factors afterwards)")
        for p in proposals:
            _row(ctx, p, step)
        kept = [p for p in proposals if p.kept]
        ctx.summary.update({
            "factorized_layers": len(kept), "candidate_layers": len(proposals),
            "layer_macs_before": sum(p.macs_before * p.site.calls for p in proposals),
            "layer_macs_after": sum((p.macs_after if p.kept else p.macs_before) * p.site.calls
                                    for p in proposals),
        })
        if config.measure_latency:
            ctx.note(f"{step}: {len(kept)} of {len(proposals)} layers replaced; each replacement "
                     f"timed against its layer on {ctx.target.backend} at batch "
                     f"{config.latency_batch} and kept only where faster")
            elsewhere = ctx.target.latency_note()
            if elsewhere:
                ctx.note(f"{step}: {elsewhere}")
        else:
            ctx.note(f"{step}: {len(kept)} of {len(proposals)} layers replaced where MACs fall "
                     "(measure_latency: false, no latency check)")
    return proposals


def target_note(model: nn.Module, example_inputs, model_macs: int | None, target: float | None,
                proposals: list[Proposal], step: str, backend: str) -> str | None:
    """When ``target_macs`` is missed because the latency check kept layers whole, say so."""
    if model_macs is None or target is None:
        return None
    from lighten.measure import count_macs

    reached = count_macs(model, example_inputs) / model_macs
    slower = sum(1 for p in proposals if not p.kept and p.ms_before is not None)
    if reached <= target + 0.01 or not slower:
        return None
    return (f"{step}: MACs are {reached:.2f} of before, not the target {target:g}: {slower} "
            f"layer(s) stayed whole because their factorized form was not faster on {backend}; "
            "measure_latency: false replaces them all and meets the target")


def _rank_text(rank) -> str:
    return "x".join(str(r) for r in rank) if isinstance(rank, tuple) else str(rank)


def _row(ctx: StepContext, p: Proposal, step: str) -> None:
    facts = {"rank": list(p.rank) if isinstance(p.rank, tuple) else p.rank,
             "macs_before": p.macs_before, "macs_after": p.macs_after,
             "error": round(p.error, 5), "decision": "kept" if p.kept else "reverted",
             **p.extra}
    if p.ms_before is not None:
        facts.update(ms_before=round(p.ms_before, 5), ms_after=round(p.ms_after, 5))
    ms = (f", {p.ms_before:.3g} → {p.ms_after:.3g} ms" if p.ms_before is not None else "")
    text = f"rank {_rank_text(p.rank)}, MACs {p.macs_before:,} → {p.macs_after:,}{ms}"
    if p.kept:
        ctx.layer(p.site.name, "factorize", before=describe(p.site.module),
                  after=describe(p.module), reason=text, **facts)
    else:
        ctx.layer(p.site.name, "keep", before=describe(p.site.module),
                  after=describe(p.site.module), reason=f"{p.reason} ({text})", **facts)


def _inside_fused(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a part of nn.MultiheadAttention or of a registered lighten module
    (a pruned attention, a quantized layer): those read their parts' ``weight``/``bias``
    themselves, so a part cannot become two layers."""
    from lighten.modules import registered_key

    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    return isinstance(parent, nn.MultiheadAttention) or registered_key(parent) is not None


def check_runs(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], step: str) -> None:
    """The factorized model still runs (a forward reading a replaced layer's ``.weight``
    directly would not): one clear error instead of a failure later."""
    try:
        with torch.no_grad():
            model.eval()(*example_inputs)
    except Exception as exc:
        raise UnsupportedError(
            f"{step}: the model no longer runs after factorizing ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); its forward probably reads a "
            "layer's weight directly: list that layer under ignore") from exc


def apply_to_target(model: nn.Module, proposals: list[Proposal], config, ctx, step: str,
                    example_inputs, model_macs: int | None, rank_note: str | None) -> nn.Module:
    """The end of a step with a MAC target (svd, tucker): apply the proposals, note how the
    ranks were chosen and whether the target was missed, check and fine-tune."""
    apply_proposals(model, proposals, config, ctx, step=step)
    if ctx is not None:
        missed = target_note(model, example_inputs, model_macs, config.target_macs, proposals,
                             step, ctx.target.backend)
        for line in (rank_note, missed):
            if line:
                ctx.note(line)
    return finish(model, config, ctx, step, example_inputs)


def finish(model: nn.Module, config: LowRankConfig, ctx: StepContext | None, step: str,
           example_inputs) -> nn.Module:
    check_runs(model, example_inputs, step)
    if ctx is not None and config.finetune is not None:
        ctx.finetune(model, config.finetune)
    return model


def example_inputs_of(ctx: StepContext) -> tuple[torch.Tensor, ...]:
    return tuple(ctx.example_inputs(1))
