"""``arch.nas``: search an architecture under a MAC, parameter, bytes or latency budget.

**Space.** Per-stage widths, expansion (inner block widths), depth, kernel size and block type
(conv / depthwise-separable), derived from the user's model (:mod:`lighten.arch.nas_space`;
ResNet-20 gets 3 stages of width x expansion x depth) with the choice lists in ``space:``; or a
factory given in the recipe, ``space: {python: file.py:build, params: {k: [choices]}}``.

**Evaluation: short proxy training of sub-networks of the trained model.** A supernet
(Once-for-All) amortises training over many subnets, but it must itself be trained for many
epochs with progressive shrinking before its subnets rank correctly, and it needs the model
rewritten into elastic layers (which our user-model surgery cannot express for any model). The
user's trained model is already the largest network of the space, so with ``init: inherit``
(the default) each candidate *is* a sub-network of it: a stage keeps its first blocks, each
channel group its most important channels (DepGraph's group L2, the way OFA sorts channels
before shrinking), and only layers whose kernel or block type changed start fresh. Each
candidate is then trained briefly on a subset of the training data (``proxy:``) and scored on
held-out *training* samples (never the test set): the ranking is of how well each shape
recovers from the trained weights, which is what the final ``finetune:`` then does at full
length. ``init: scratch`` trains every candidate and the result from fresh weights (for an
untrained model, or a ``space.python`` factory, which always starts fresh).

**Budget.** ``target_macs`` / ``target_params`` / ``target_bytes`` (a fraction <= 1 of the input
model's, or an absolute count) are counted; ``target_latency`` (fraction of the input model's
measured batch-1 latency) / ``target_latency_ms`` use the per-layer latency table calibrated on
the deployment backend (:mod:`lighten.arch.nas_latency`). A sampled shape over the budget is
scaled uniformly (bisection on a width scale, 0.05 to 4) to the widest that fits, so each
trial is a candidate at the budget; only shapes that do not fit even at 5% width are rejected
(pruned trials, not counted in ``trials``). The result's counted cost (and measured latency
for a latency budget) is checked and reported. A prediction is not a measurement: under a
latency budget the finalists (below) are timed whole together with the input model, and each
is refitted to the budget (less ``latency_margin``, for timing noise) by its own
measured/predicted ratio, narrower or wider, and timed again (a widened one that then measures
over goes back); the pick is among those measured within it. The budget is a fraction of the
input model's latency *in the same rounds*, which is what the final check compares too:
absolute times drift several % on a shared machine (last session's result was 4% over a budget
taken from a timing minutes earlier).

**Search.** Optuna, TPE (default; the model's own shape is the first trial, so the uniformly
narrowed model is always a candidate) or NSGA-II (accuracy and cost), seeded, in an SQLite
study under the run's ``stages/`` folder (:mod:`lighten.arch.nas_search`): ``--resume`` skips
finished trials. The folder also gets ``candidates.csv`` (every trial) and ``pareto.png``.
The model's own shape at the budget is also what ``prune.channels`` with one ratio for every
group builds (its channels picked by L2 instead of group L2), so both classic contenders start
the search. Then **successive halving** (``rerank:``): the short proxy's ranking is noisy at the
0.1-0.3 points that separate good shapes, so the ``top`` best of it and the model's own shape
are trained again on several times more images and scored on a larger held-out set; the result
is the best of these finalists (all at the budget), never a shape picked on one noisy score.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from lighten.errors import RecipeError, UnsupportedError
from lighten.registry import register_step
from lighten.step import FinetuneConfig, StepConfig, StepContext, StrictModel

__all__ = ["NASConfig", "NASResult", "nas_"]

TARGETS = ("target_macs", "target_params", "target_bytes", "target_latency", "target_latency_ms")
_UNITS = {"s": 1, "m": 60, "h": 3600}


class NASSpaceConfig(StrictModel):
    """``space:``: choice lists applied to the stages derived from the model, or a factory."""

    widths: list[float] = Field([0.5, 0.625, 0.75, 0.875, 1.0, 1.25], min_length=1,
                                description="width multipliers per stage")
    expansions: list[float] = Field([0.5, 0.75, 1.0], min_length=1,
                                    description="inner block width multipliers per stage")
    depths: Literal["auto"] | list[int] = Field("auto", description="blocks per stage; auto: "
                                                "from the non-removable ones to all")
    kernels: list[int] | None = Field(None, description="k x k conv kernel sizes (odd); unset: "
                                      "kept")
    blocks: list[Literal["conv", "separable"]] = Field(["conv"], min_length=1,
                                                       description="conv and/or separable")
    round_to: int = Field(4, ge=1, description="searched widths are multiples of this")
    ignore: list[str] = Field(default_factory=list, description="modules whose widths stay")
    python: str | None = Field(None, description="'file.py:build': a factory called with one "
                               "choice of each of params (instead of a derived space)")
    params: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("widths", "expansions")
    @classmethod
    def _positive(cls, v):
        if any(x <= 0 for x in v):
            raise ValueError(f"multipliers must be > 0, got {v}")
        return v

    @field_validator("kernels")
    @classmethod
    def _odd(cls, v):
        if v is not None and any(k < 1 or k % 2 == 0 for k in v):
            raise ValueError(f"kernels must be odd (same padding), got {v}")
        return v

    @model_validator(mode="after")
    def _factory(self, info: ValidationInfo):
        base_dir = (info.context or {}).get("base_dir") if info is not None else None
        if self.python and base_dir is not None:  # recipe-relative, as the model: block
            file_part, sep, rest = self.python.partition(":")
            candidate = Path(base_dir) / file_part
            if not Path(file_part).is_absolute() and candidate.exists():
                self = self.model_copy(update={"python": f"{candidate.resolve()}{sep}{rest}"})
        if self.python is not None and not self.params:
            raise ValueError("space.python needs params: {name: [choices], ...}")
        if self.params and self.python is None:
            raise ValueError("space.params are the keyword choices of space.python "
                             "('file.py:build'); give it, or use widths / depths / ...")
        if any(not isinstance(v, list) or not v for v in self.params.values()):
            raise ValueError("space.params: each parameter needs a non-empty list of choices")
        return self


class ProxyConfig(StrictModel):
    """``proxy:``: the short training that scores each candidate."""

    epochs: float = Field(1.0, gt=0, description="epochs over the proxy subset")
    train: int = Field(4096, ge=1, description="training samples each candidate trains on")
    holdout: int = Field(1024, ge=1, description="held-out training samples it is scored on")
    lr_scale: float = Field(1.0, gt=0, description="x the recipe's train lr")
    batch_size: int | None = Field(None, ge=1, description="unset: the recipe's train "
                                   "batch size (smaller: more steps from a small subset)")


class RerankConfig(ProxyConfig):
    """``rerank:``: the second rung of successive halving. The short proxy ranks shapes that
    differ by 0.1-0.3 points with about that much noise (5,000 images, 1,000 scored), so the
    ``top`` best by it, and always the model's own shape at the budget (the uniformly narrowed
    contender), are trained again on more images and scored on a larger held-out set; the
    result is the best of these. ``top: 0`` picks by the short proxy alone."""

    top: int = Field(4, ge=0, description="best short-proxy candidates re-scored (0: off)")
    train: int | None = Field(None, ge=1, description="training samples each finalist trains "
                              "on; unset: 4x proxy.train")
    holdout: int | None = Field(None, ge=1, description="held-out training samples it is "
                                "scored on; unset: 4x proxy.holdout")

    def resolved(self, proxy: ProxyConfig) -> ProxyConfig:
        """The second rung as a proxy: unset sizes and batch from the first rung."""
        return ProxyConfig(epochs=self.epochs, train=self.train or 4 * proxy.train,
                           holdout=self.holdout or 4 * proxy.holdout, lr_scale=self.lr_scale,
                           batch_size=self.batch_size or proxy.batch_size)


class NASFinetuneConfig(FinetuneConfig):
    """``finetune:`` of arch.nas trains the chosen architecture: full lr (what a fresh model
    needs; an inherited one has lost channels and blocks and recovers at it too)."""

    lr_scale: float = Field(1.0, gt=0, description="without lr: x the recipe's train lr")


class NASConfig(StepConfig):
    target_macs: float | None = Field(None, gt=0, description="<= 1: fraction of the model's "
                                      "MACs; > 1: MACs")
    target_params: float | None = Field(None, gt=0)
    target_bytes: float | None = Field(None, gt=0, description="float32 state bytes")
    target_latency: float | None = Field(None, gt=0, description="fraction of the model's "
                                         "measured batch-1 latency on the deployment backend")
    target_latency_ms: float | None = Field(None, gt=0, description="batch-1 ms")
    trials: int = Field(40, ge=1, description="candidates proxy-trained")
    time_budget: float | str | None = Field(None, description="stop starting trials after "
                                            "this: seconds, or '30m', '1h', '90s'")
    sampler: Literal["tpe", "nsga2"] = "tpe"
    init: Literal["inherit", "scratch"] = Field("inherit", description="candidates keep the "
                                                "trained model's most important channels and "
                                                "first blocks (inherit), or start fresh")
    space: NASSpaceConfig = Field(default_factory=NASSpaceConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    predict_latency: bool | None = Field(None, description="build the latency table and "
                                         "report its error (default: only for latency budgets)")
    latency_runs: int = Field(20, ge=1, description="timed runs per layer / model")
    check_models: int = Field(3, ge=0, description="candidates timed whole for the predictor "
                              "error (besides the result)")
    latency_margin: float = Field(0.02, ge=0, lt=0.5, description="a latency budget's "
                                  "finalists must measure this fraction under it (timing "
                                  "noise on a busy machine is 1-2%)")
    finetune: NASFinetuneConfig | None = Field(None, description="training of the chosen "
                                               "architecture; unset: the recipe's train epochs")

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one budget of " + ", ".join(TARGETS)
                             + f"; got {given or 'none'}")
        seconds(self.time_budget)
        return self

    @property
    def target(self) -> tuple[str, float, bool]:
        """(cost kind, value, is a fraction of the input model's)."""
        key = next(k for k in TARGETS if getattr(self, k) is not None)
        value = getattr(self, key)
        if key == "target_latency_ms":
            return "latency", value, False
        if key == "target_latency":
            return "latency", value, True
        return key.removeprefix("target_"), value, value <= 1


def seconds(value: float | str | None) -> float | None:
    """``time_budget`` in seconds: a number, or '30m' / '1.5h' / '90s'."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", value)
    if not m:
        raise ValueError(f"time_budget {value!r} is not a duration; write e.g. 30m, 2h or 600")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


class NASResult:
    """What :func:`nas_` found: the chosen model (not yet fine-tuned), its trial and the study
    rows."""

    def __init__(self, model, spec, best: dict, rows: list[dict], front: list[dict],
                 folder: Path, budget: float, kind: str, reference_cost: float, extra: dict):
        self.model, self.spec, self.best, self.rows, self.front = model, spec, best, rows, front
        self.folder, self.budget, self.kind = folder, budget, kind
        self.reference_cost, self.extra = reference_cost, extra


def _key(config: NASConfig, model: nn.Module, ctx: StepContext) -> str:
    settings = config.model_dump(mode="json", exclude={"finetune", "check_models", "trials",
                                                       "time_budget"})
    text = json.dumps([settings, str(model), [tuple(p.shape) for p in model.parameters()],
                       len(ctx.data.train), list(ctx.input_shape), ctx.seed], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _proxy_split(ctx: StepContext, proxy: ProxyConfig) -> tuple[list[int], list[int]]:
    n = len(ctx.data.train)
    if n < 2:
        raise RecipeError(f"arch.nas needs training data to score candidates; got {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed)).tolist()
    hold = min(proxy.holdout, max(1, n // 5))
    return perm[hold:hold + proxy.train], perm[:hold]


def proxy_score(model: nn.Module, ctx: StepContext, proxy: ProxyConfig, split, seed: int
                ) -> float:
    """Train ``model`` briefly on the proxy subset (in place); its held-out score."""
    from torch.utils.data import Subset

    from lighten.training import evaluate, train

    base = ctx.train_config
    cfg = base.model_copy(update={"epochs": proxy.epochs, "seed": seed,
                                  "lr": base.lr * proxy.lr_scale,
                                  "batch_size": proxy.batch_size or base.batch_size})
    train(model, Subset(ctx.data.train, split[0]), cfg, progress=False, task=ctx.task)
    return float(evaluate(model, Subset(ctx.data.train, split[1]), task=ctx.task))


def _search_folder(ctx: StepContext, key: str, keep: list) -> Path:
    if Path(ctx.workdir).resolve() == Path(tempfile.gettempdir()).resolve():
        tmp = tempfile.TemporaryDirectory(prefix="lighten-nas-")  # lighten.compress default
        keep.append(tmp)
        ctx.note("arch.nas: the search folder is temporary; pass workdir= to keep its study, "
                 "CSV and plot")
        return Path(tmp.name)
    folder = Path(ctx.workdir) / "stages" / f"nas-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def nas_(model: nn.Module, config: NASConfig, ctx: StepContext) -> NASResult:
    """Search; the returned model is the chosen architecture, untrained: with the input
    model's inherited weights (``init: inherit``) or fresh ones."""
    from lighten.arch.nas_build import COSTS, CandidateBuilder, fit_to_budget, layer_macs
    from lighten.arch.nas_search import import_optuna, pareto_front, run_study, trial_rows
    from lighten.arch.nas_space import FactorySpace, derive_space

    import_optuna()  # the one clear error before any work
    example = ctx.example_inputs(1)
    kind, value, fraction = config.target
    keep: list = []
    folder = _search_folder(ctx, _key(config, model, ctx), keep)
    model = copy.deepcopy(model).eval()
    if config.space.python is not None:
        space = FactorySpace(config.space.python, dict(config.space.params),
                             list(ctx.input_shape))
    else:
        space = derive_space(model, example, config.space)
    table = None
    macs_ratio = 1.0
    if kind == "macs":
        counted = COSTS["macs"](model, example)
        macs_ratio = counted / max(1, layer_macs(model, example))
    if kind == "latency" or config.predict_latency:
        from lighten.arch.nas_latency import LatencyTable

        table = LatencyTable(ctx.target.backend, ctx.target.threads, runs=config.latency_runs,
                             path=folder / "latency_table.json")

    def cost_of(m: nn.Module, arch: dict | None = None) -> float:
        if kind == "latency":
            return table.predict(m, example)
        if kind == "macs":
            fast = (builder.macs(m, arch) if arch is not None and builder is not None
                    else layer_macs(m, example))
            return fast * macs_ratio
        return float(COSTS[kind](m, example))

    def build_factory(arch: dict, seed: int) -> nn.Module:
        from lighten.models import ModelSpec, build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(ModelSpec(**space.spec(arch)), input_shape=ctx.input_shape,
                               num_classes=ctx.data.num_classes, task=ctx.task)

    inherit = config.init == "inherit" and config.space.python is None
    if inherit and max(config.space.widths) * max(config.space.expansions) > 1:
        ctx.note("arch.nas: init: inherit keeps sub-networks of the model, so no stage grows "
                 "past its current width (space widths/expansions > 1 are capped)")
    builder = (CandidateBuilder(model, space, example, inherit=inherit)
               if config.space.python is None else None)
    extra: dict = {}
    if table is not None:  # calibrate on the input model and uniformly narrowed copies
        ref = space.reference()
        calib = [model] + ([builder(ref, scale=s, seed=ctx.seed) for s in (0.75, 0.5, 0.35)]
                           if builder is not None else [])
        if builder is not None and ref != space.shallowest():  # depth too: see nas_latency
            calib += [builder(space.shallowest(), scale=s, seed=ctx.seed) for s in (1.0, 0.5)]
        measured = ([p[1] for p in table.calibration] if table.calibration  # a resumed search
                    else table.calibrate(calib, example, ctx.task.inputs))
        extra["input_latency_ms"] = measured[0]
        extra["calibration_models"] = len(calib)
    reference_cost = extra["input_latency_ms"] if kind == "latency" else cost_of(model)
    budget = value * reference_cost if fraction else value

    def propose(arch: dict, trial):
        from lighten.arch.nas_search import Candidate

        seed = ctx.seed + trial.number
        if builder is not None:
            # costs are read off shapes: the widths tried are built on the meta device
            m, scale, c = fit_to_budget(lambda s: builder(arch, scale=s, seed=seed, meta=True),
                                        lambda m: cost_of(m, arch), budget)
            if m is not None:
                m = builder(arch, scale=scale, seed=seed)
        else:
            m, scale = build_factory(arch, seed), 1.0
            c = cost_of(m)
            if c > budget:
                m = None
        if m is None:
            trial.set_user_attr(kind, c)
            return None
        facts = _facts(m, example, table, space, builder)
        facts[kind if kind != "latency" else "predicted_ms"] = c
        # the exact scale: rebuilding at a rounded one can cross a width's rounding boundary
        facts.update(scale=scale, describe=space.describe(arch))
        for k, v in facts.items():
            trial.set_user_attr(k, v)
        return Candidate(arch, scale, c, facts)

    def score(cand, trial) -> float:
        m = builder(cand.arch, scale=cand.scale, seed=ctx.seed + trial.number) \
            if builder is not None else build_factory(cand.arch, ctx.seed + trial.number)
        return proxy_score(m, ctx, config.proxy, split, ctx.seed + trial.number)

    split = _proxy_split(ctx, config.proxy)
    start = time.perf_counter()
    study = run_study(storage=folder / "study.db", name="arch.nas", sampler=config.sampler,
                      seed=ctx.seed, trials=config.trials,
                      time_budget_s=seconds(config.time_budget), sample=space.sample,
                      propose=propose, score=score, reference=space.reference(),
                      progress=ctx.note)
    extra["study_seconds"] = round(time.perf_counter() - start, 1)
    rows = trial_rows(study)
    for r in rows:  # second-rung scores of a resumed search
        r.update(study.user_attrs.get(f"rerank.{r['trial']}", {}))
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        raise UnsupportedError(_nothing_fits(rows, kind, budget, reference_cost, space))

    def rebuild(row: dict, scale: float | None = None, meta: bool = False) -> nn.Module:
        arch = {k.removeprefix("choice."): v for k, v in row.items() if k.startswith("choice.")}
        if builder is not None:
            return builder(arch, scale=row["scale"] if scale is None else scale,
                           seed=ctx.seed + row["trial"], meta=meta)
        return build_factory(arch, ctx.seed + row["trial"])

    def measured_limit(finalists: list[dict]) -> None:
        """Time the finalists whole with the input model in the same rounds, then fit each
        to the budget (less the margin) by its own measured/predicted ratio: narrower where
        the predictor was optimistic, wider where it was pessimistic; the refitted ones are
        timed again, and a widened one over the budget goes back to its measured width.
        ``within_budget`` says where each ended."""
        from lighten.arch.nas_build import fit_to_budget
        from lighten.arch.nas_latency import measure_models

        def measure(rows: list[dict]) -> float:
            ms = measure_models([model] + [rebuild(r) for r in rows], backend=ctx.target.backend,
                                threads=ctx.target.threads, inputs=ctx.task.inputs,
                                runs=config.latency_runs)
            limit = (value * ms[0] if fraction else value) * (1 - config.latency_margin)
            for r, m in zip(rows, ms[1:], strict=True):
                r.update(measured_ms=round(m, 4), input_measured_ms=round(ms[0], 4),
                         within_budget=m <= limit)
            return limit

        limit = measure(finalists)
        if builder is None:
            return
        moved, before = [], {}
        for r in finalists:
            goal = limit * r["predicted_ms"] / r["measured_ms"]
            m, scale, c = fit_to_budget(lambda s, r=r: rebuild(r, s, meta=True),
                                        lambda m: table.predict(m, example), goal)
            if m is None or abs(c - r["predicted_ms"]) < 1e-6:
                continue  # no other width of this shape: it stays as measured
            before[r["trial"]] = {k: r[k] for k in ("scale", "predicted_ms", "measured_ms",
                                                    "within_budget")}
            r.update(search_scale=r.get("search_scale", r["scale"]), scale=scale,
                     predicted_ms=round(c, 4))
            moved.append(r)
        if moved:
            measure(moved)
        for r in moved:
            old = before[r["trial"]]
            if not r["within_budget"] and old["within_budget"]:
                r.update(old)  # widened past the budget: back to the width that fit
            facts = _facts(rebuild(r), example, table, space, builder)
            r.update(macs=facts["macs"], params=facts["params"], bytes=facts["bytes"])

    best = max(done, key=lambda r: (r["proxy_accuracy"], -r["trial"]))
    finalists: list[dict] = []
    if config.rerank.top > 0:
        ranked = sorted(done, key=lambda r: (-r["proxy_accuracy"], r["trial"]))
        finalists = ranked[:config.rerank.top] + [
            r for r in ranked[config.rerank.top:] if r.get("enqueued")]
        if kind == "latency":
            measured_limit(finalists)
        longer = config.rerank.resolved(config.proxy)
        long_split = _proxy_split(ctx, longer)
        if len(long_split[0]) <= len(split[0]) and len(long_split[1]) <= len(split[1]):
            ctx.note(f"rerank: the data has {len(ctx.data.train)} training samples, so the "
                     f"second rung trains on {len(long_split[0])} and scores on "
                     f"{len(long_split[1])}, no more than the first: it re-scores the "
                     f"finalists with {longer.epochs:g} epochs, not on more images")
        for r in finalists:
            if r.get("rerank_accuracy") is not None and r.get("rerank_scale") == r["scale"]:
                continue  # a resumed search: already re-scored at this width
            t0 = time.perf_counter()
            acc = proxy_score(rebuild(r), ctx, longer, long_split, ctx.seed + r["trial"])
            r.update(rerank_accuracy=acc, rerank_scale=r["scale"],
                     rerank_seconds=round(time.perf_counter() - t0, 2))
            # finished trials cannot change: the second rung is kept on the study
            study.set_user_attr(f"rerank.{r['trial']}", {k: r[k] for k in (
                "rerank_accuracy", "rerank_scale", "rerank_seconds")})
        pool = [r for r in finalists if r.get("within_budget", True)] or finalists
        best = max(pool, key=lambda r: (r["rerank_accuracy"], r["proxy_accuracy"],
                                        -r["trial"]))
    extra["finalists"] = finalists
    extra["search_seconds"] = round(time.perf_counter() - start, 1)
    chosen = rebuild(best)
    spec = None if builder is not None else space.spec(
        {k.removeprefix("choice."): v for k, v in best.items() if k.startswith("choice.")})
    cost_key = kind if kind != "latency" else "predicted_ms"
    front = pareto_front(rows, cost_key)
    if table is not None:
        from lighten.arch.nas_latency import measure_models

        others = [r for r in sorted(front, key=lambda r: -r["proxy_accuracy"])
                  if r["trial"] != best["trial"]][: config.check_models]
        models = [chosen] + [rebuild(r) for r in others]
        predicted = [table.predict(m, example) for m in models]
        # timed with the input model in the same rounds: the budget check is a ratio
        measured = measure_models([model] + models, backend=ctx.target.backend,
                                  threads=ctx.target.threads, inputs=ctx.task.inputs,
                                  runs=config.latency_runs)
        extra["predictor"] = list(zip(predicted, measured[1:], strict=True))
        extra["check_input_ms"] = measured[0]
        extra["check_input_predicted_ms"] = table.predict(model, example)
    for t in keep:
        extra.setdefault("_temporary", []).append(t)
    return NASResult(chosen, spec, best, rows, front, folder, budget, kind, reference_cost,
                     extra)


def _facts(m: nn.Module, example, table, space, builder) -> dict:
    from lighten.arch.nas_build import COSTS, layer_macs, stage_widths

    facts = {"macs": layer_macs(m, example), "params": COSTS["params"](m, example),
             "bytes": COSTS["bytes"](m, example)}
    if table is not None:
        facts["predicted_ms"] = round(table.predict(m, example), 4)
    if builder is not None:
        facts["widths"] = json.dumps(stage_widths(m, space, example))
    return facts


FINALIST_KEYS = ("trial", "describe", "enqueued", "scale", "search_scale", "proxy_accuracy",
                 "rerank_accuracy", "rerank_seconds", "macs", "predicted_ms", "measured_ms",
                 "input_measured_ms", "within_budget")
UNIT = {"macs": "MACs", "params": "params", "bytes": "bytes", "latency": "ms (batch 1)"}


def _layer_rows(before: nn.Module, after: nn.Module, ctx: StepContext) -> None:
    """One row per weighted layer whose shape changed (``resize``) or that is gone
    (``remove``: a dropped block's layers) in the chosen architecture."""
    now = dict(after.named_modules())
    for name, old in before.named_modules():
        weight = getattr(old, "weight", None)
        if not name or not isinstance(weight, torch.Tensor) or not list(old.children()) == []:
            continue
        new = now.get(name)
        new_weight = getattr(new, "weight", None)
        if not isinstance(new_weight, torch.Tensor):
            ctx.layer(name, "remove", before=str(list(weight.shape)), after="removed")
        elif new_weight.shape != weight.shape:
            ctx.layer(name, "resize", before=str(list(weight.shape)),
                      after=str(list(new_weight.shape)), shape_after=list(new_weight.shape))


@register_step("arch.nas", NASConfig,
               needs_data=lambda c: "labelled training data (each candidate is proxy-trained)")
def arch_nas(model: nn.Module, config: NASConfig, ctx: StepContext) -> nn.Module:
    """Search the space under the budget, then train the chosen architecture."""
    from lighten.arch.nas_build import COSTS
    from lighten.arch.nas_search import write_csv, write_plot

    result = nas_(model, config, ctx)
    kind, best, extra = result.kind, result.best, result.extra
    cost_key = kind if kind != "latency" else "predicted_ms"
    write_csv(result.rows, result.folder / "candidates.csv")
    plotted = write_plot(result.rows, result.front, cost_key, UNIT[kind], result.budget,
                         best["trial"], result.folder / "pareto.png")
    shown = result.front + ([] if any(r["trial"] == best["trial"] for r in result.front)
                            else [best])
    # the Pareto front (accuracy vs cost) is a summary table; the per-layer rows say what the
    # chosen architecture changed in each layer of the model it started from
    ctx.summary["pareto_front"] = [
        {"trial": r["trial"], "chosen": r["trial"] == best["trial"],
         "shape": r.get("describe", ""), "proxy_accuracy": r["proxy_accuracy"],
         "macs": r.get("macs"), "params": r.get("params"), "bytes": r.get("bytes"),
         "predicted_ms": r.get("predicted_ms"), "rerank_accuracy": r.get("rerank_accuracy")}
        for r in shown]
    for r in shown:
        ctx.note(f"arch.nas Pareto front: trial {r['trial']}"
                 f"{' (chosen)' if r['trial'] == best['trial'] else ''}: "
                 f"{r.get('describe', '')}, proxy acc {r['proxy_accuracy']:.4f}, "
                 f"{UNIT[kind]} {r[cost_key]:.4g}")
    _layer_rows(model, result.model, ctx)
    complete = sum(r["state"] == "complete" for r in result.rows)
    rejected = sum(r["state"] == "pruned" for r in result.rows)
    for r in extra["finalists"]:
        ctx.note(f"arch.nas finalist: trial {r['trial']}"
                 f"{' (chosen)' if r['trial'] == best['trial'] else ''}: "
                 f"{r.get('describe', '')}, proxy acc {r['proxy_accuracy']:.4f}, longer proxy "
                 f"{r['rerank_accuracy']:.4f}"
                 + (f", measured {r['measured_ms']:.3g} ms (input {r['input_measured_ms']:.3g} "
                    f"ms{'' if r['within_budget'] else ', over the budget'})"
                    if "measured_ms" in r else ""))
    ctx.note(f"arch.nas: {complete} candidate(s) proxy-trained ({rejected} shape(s) over the "
             f"budget at any width) in {extra['search_seconds']:.0f} s; chosen trial "
             f"{best['trial']}: {best.get('describe', '')} (proxy acc "
             f"{best['proxy_accuracy']:.4f}); every candidate in "
             f"{result.folder / 'candidates.csv'}"
             + (f", plot {result.folder / 'pareto.png'}" if plotted else ""))
    if result.spec is not None:  # a factory's model: its artifact rebuilds from the kwargs
        ctx.source_spec = result.spec
        ctx.summary["source_spec"] = result.spec
    chosen = result.model.train()
    ft = config.finetune or NASFinetuneConfig(epochs=ctx.train_config.epochs)
    if config.finetune is None:
        ctx.note(f"arch.nas: the chosen architecture trains for the recipe's "
                 f"{ft.epochs:g} train epochs (set finetune: to change it)")
    chosen = ctx.finetune(chosen, ft)
    example = ctx.example_inputs(1)
    summary = {"budget_kind": kind, "budget": result.budget, "init": config.init,
               "trials": complete,
               "rejected": rejected, "search_seconds": extra["search_seconds"],
               "chosen_trial": best["trial"], "chosen": best.get("describe"),
               "chosen_arch": {k.removeprefix("choice."): v for k, v in best.items()
                               if k.startswith("choice.")},
               "chosen_scale": best.get("scale"), "study_seconds": extra["study_seconds"],
               "proxy_accuracy": best["proxy_accuracy"],
               "rerank_accuracy": best.get("rerank_accuracy"),
               "finalists": [{k: r.get(k) for k in FINALIST_KEYS}
                             for r in extra["finalists"]],
               "search_folder": str(result.folder)}
    for k in ("macs", "params", "bytes"):
        summary[f"{k}_before"] = COSTS[k](model, example)
        summary[f"{k}_after"] = COSTS[k](chosen, example)
    if kind != "latency":
        summary["budget_met"] = summary[f"{kind}_after"] <= result.budget * (1 + 1e-9)
        if not summary["budget_met"]:
            ctx.note(f"arch.nas: counted {kind} {summary[f'{kind}_after']} exceed the budget "
                     f"{result.budget:.4g} (the search's fast count missed some ops)")
    pairs = extra.get("predictor")
    if pairs:
        errors = [abs(p - m) / m for p, m in pairs if m > 0]
        # a shared machine's load moves every absolute time between the calibration and this
        # check; the predicted fraction of the input model's time (what a fractional budget
        # reads) against the fraction measured in the same rounds does not move with it
        p_in, m_in = extra["check_input_predicted_ms"], extra["check_input_ms"]
        ratio_errors = [abs((p / p_in) / (m / m_in) - 1) for p, m in pairs if m > 0 < p_in]
        # an affine fit under load can predict a non-positive time for the input model: then
        # there is no fraction to compare
        error = statistics.median(errors) if errors else None
        ratio_error = statistics.median(ratio_errors) if ratio_errors else None
        summary.update(predicted_ms=pairs[0][0], measured_ms=pairs[0][1],
                       input_latency_ms=extra.get("input_latency_ms"),
                       predictor_median_error=error, predictor_ratio_error=ratio_error,
                       predictor_checked=len(errors), input_check_ms=m_in)
        ctx.note(f"arch.nas latency predictor ({ctx.target.backend}, per-layer table + affine "
                 f"fit on {extra.get('calibration_models')} model(s)): median error "
                 f"{_percent(error)} in ms and {_percent(ratio_error)} as a fraction of the input "
                 f"model's time on {len(errors)} other model(s); the input model measured "
                 f"{extra.get('input_latency_ms', 0):.3g} ms at calibration and {m_in:.3g} ms "
                 f"at this check (the load moves ms, not fractions); result predicted "
                 f"{pairs[0][0]:.3g} ms, measured {pairs[0][1]:.3g} ms")
        if kind == "latency":  # against the input model timed in the same rounds
            _, value, fraction = config.target
            limit = value * extra["check_input_ms"] if fraction else value
            summary.update(budget_met=pairs[0][1] <= limit, budget_check_ms=limit,
                           input_check_ms=extra["check_input_ms"])
            ctx.note(f"arch.nas latency budget: the result measured {pairs[0][1]:.3g} ms, the "
                     f"input model {extra['check_input_ms']:.3g} ms in the same rounds: "
                     f"budget {limit:.3g} ms {'met' if summary['budget_met'] else 'NOT met'}")
    ctx.summary.update(summary)
    for t in extra.get("_temporary", []):
        t.cleanup()
    return chosen


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _nothing_fits(rows: list[dict], kind: str, budget: float, reference: float, space) -> str:
    """Why no candidate fits: the usual (the budget is below the smallest widths), or the one
    a user cannot guess (no choice of the space changes the model at all)."""
    tried = [r[kind] for r in rows if isinstance(r.get(kind), (int, float))]
    message = f"arch.nas: no candidate fits the budget ({kind} <= {budget:.4g})"
    if tried and min(tried) >= 0.99 * reference and kind != "latency":
        stages = getattr(space, "stages", None)
        resizable = sum(s.groups for s in stages) if stages is not None else None
        notes = getattr(space, "notes", None) or []
        return (message + f": no choice of the search space changes this model's {kind} (the "
                f"smallest widths still count {min(tried):.4g}, the input's {reference:.4g}"
                + (f"; {resizable} resizable channel groups" if resizable is not None else "")
                + (f"; {notes[0]}" if notes else "") + "); use prune.channels or a distill "
                "student: {width: ...}, or give space: {python: ...} a factory to search")
    return message + "; raise the target or widen space.widths"
