"""Apply a recipe: baseline, then each step; save, measure and record every stage.

Output folder layout (other tools read it; keep the names)::

    OUTPUT/metrics.jsonl               one JSON row per stage, first "baseline"
    OUTPUT/run.json                    recipe, its hash, provenance, notes
    OUTPUT/state.json                  what is done, for --resume
    OUTPUT/stages/NN-<stage>.safetensors   the model after each stage (lighten artifact)
    OUTPUT/stages/NN-<stage>.layers.json   per quantized layer: bits, scales, SQNR vs float
    OUTPUT/stages/NN-<stage>.report.json   the step's Report: per-layer rows, notes, summary
    OUTPUT/deploy/<stage>/             what each stage deploys (model.onnx), timed at the end
    OUTPUT/latency.json                every stage timed together: rounds, orders, medians, IQRs
    OUTPUT/report.md, report.html      written at the end
    OUTPUT/checkpoints/baseline.safetensors   baseline training state at its last epoch end
                                       (only while the baseline trains; --resume continues it)

run.json and state.json are written before the baseline trains (run.json's ``status``: started,
running, finished), so an interrupted baseline training is a run that ``--resume`` continues.

Everything the user got wrong (recipe, data, model, weights) is found before the output folder is
touched, so a bad run never damages the output of a good one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lighten.errors import ModelError, RecipeError
from lighten.recipe import Recipe
from lighten.step import StepContext
from lighten.target import Target

STATE_VERSION = 1
BASELINE_CHECKPOINT = Path("checkpoints") / "baseline.safetensors"


@dataclass
class RunResult:
    output_dir: Path
    rows: list[dict]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Prepared:
    data: object
    model: nn.Module
    baseline_source: str | None  # None: the baseline is trained in the output folder
    baseline_seconds: float


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    output: str | Path | None = None,
) -> RunResult:
    """Run ``recipe``; with ``resume`` continue after the last finished stage."""
    from lighten.provenance import recipe_hash

    out = Path(output or recipe.output)
    _check_output_dir(out)
    if not overwrite:
        _check_not_foreign(out)
    recipe_dict = recipe.to_dict()
    digest = recipe_hash(recipe_dict)
    state = None if overwrite and not resume else _read_state(out)  # --overwrite: any state
    if state and not resume and not overwrite:
        raise RecipeError(f"{out} already holds a run; pass --resume to continue it or choose "
                          f"another --output (or --overwrite to replace it)")
    if resume and state and state.get("recipe_hash") != digest:
        _check_recipe_change(out, state, recipe_dict)
    if not (resume and state):
        state = None
    if state:
        _check_resumable(out, state, recipe)
        if len(state["done"]) == len(recipe.steps) + 1 and state.get("recipe_hash") == digest:
            return RunResult(out, _read_rows(out), list(state.get("notes", [])))  # all done:
            # nothing is re-run or rewritten (run.json keeps its time)

    prepared = _prepare(recipe)  # all user-input errors surface here (weights too; no training)
    _prepare_output(out, fresh=state is None)
    if state is None:  # the run record comes first: a long baseline training is a run already
        _write_started(out, recipe, digest, recipe_dict, prepared.data)
    if prepared.baseline_source is None and not (state and "baseline" in state["done"]):
        _train_baseline(prepared, recipe, out, progress=progress)
    return _execute(recipe, prepared, out, state, digest, recipe_dict, progress=progress)


def _check_recipe_change(out: Path, state: dict, recipe_dict: dict) -> None:
    """--resume accepts a recipe whose finished part is unchanged (steps may be appended or
    edited after the last finished stage); anything else is refused, naming what changed."""
    old = state.get("recipe")
    changed = [] if isinstance(old, dict) else ["the recipe (this run predates recorded "
                                                 "recipes)"]
    if isinstance(old, dict):
        finished = max(len(state["done"]) - 1, 0)  # steps behind the finished stages
        old_steps, new_steps = old.get("steps", []), recipe_dict.get("steps", [])
        changed = _differences({k: v for k, v in old.items() if k != "steps"},
                               {k: v for k, v in recipe_dict.items() if k != "steps"}, "")
        for i in range(finished):
            mine = new_steps[i] if i < len(new_steps) else "(removed)"
            changed += _differences(old_steps[i], mine, f"steps[{i}]")
    if changed:
        more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
        raise RecipeError(f"cannot resume the run in {out}: {'; '.join(changed[:4])}{more} "
                          "changed since it started (steps after the last finished stage may "
                          "change); rerun with --overwrite to replace that run, or without "
                          "--resume into a new --output")


def _differences(old, new, where: str) -> list[str]:
    """Dotted paths at which two JSON values differ, as 'path: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            found += _differences(old.get(key, "(unset)"), new.get(key, "(unset)"), path)
        return found
    return [] if old == new else [f"{where or 'recipe'}: {old!r} -> {new!r}"]


def _check_output_dir(out: Path) -> None:
    """The output folder (and its stages/) must be a folder or not exist yet: checked before
    any training, so a typo in --output does not cost a baseline run."""
    for path in (out / "stages", out, *out.parents):
        if path.exists() and not path.is_dir():
            raise RecipeError(f"cannot write the run to {out}: {path} is a file, not a folder; "
                              "choose another --output")


def _check_not_foreign(out: Path) -> None:
    """A folder with files but no lighten run in it (no state.json / run.json) is not written
    into without --overwrite: its files are someone's work."""
    if not out.is_dir() or (out / "state.json").exists() or (out / "run.json").exists():
        return
    if next(out.iterdir(), None) is not None:
        raise RecipeError(f"{out} is not empty and holds no lighten run; choose another "
                          "--output, or pass --overwrite to write the run into it anyway")


def _write_started(out: Path, recipe: Recipe, digest: str, recipe_dict: dict, data) -> None:
    """run.json (status: started) and state.json (nothing done yet) of a new run, written
    before the baseline trains so an interrupted training resumes like any other stage."""
    from lighten.provenance import atomic_write_text, provenance

    target = Target.from_deploy(recipe.deploy)
    prov = provenance(recipe_dict, recipe.seed, target=target)
    atomic_write_text(out / "run.json", json.dumps(
        {**_run_info(recipe, digest, prov, [], data), "status": "started"}, indent=2))
    atomic_write_text(out / "state.json", json.dumps(
        {"version": STATE_VERSION, "recipe_hash": digest, "done": [], "notes": [],
         "recipe": recipe_dict, "target": target.to_dict()}))


def _check_resumable(out: Path, state: dict, recipe: Recipe) -> None:
    """Every file --resume reads back exists: the finished stages and the baseline logits."""
    from safetensors import safe_open

    names = (["baseline"] + _unique_stage_names(recipe))[:len(state["done"])]
    needed = [out / "stages" / f"{i:02d}-{name}.safetensors" for i, name in enumerate(names)]
    if names:
        needed.append(out / "reference_logits.safetensors")
    for path in needed:
        problem = "is missing" if not path.is_file() else None
        if problem is None:
            try:  # the header covers the whole file: a truncated one fails here, before training
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as err:  # safetensors raises its own error type for a bad header
                problem = f"is truncated or corrupt ({(str(err).splitlines() or [''])[0]})"
        if problem:
            raise RecipeError(f"cannot resume the run in {out}: {path} {problem}; rerun with "
                              "--overwrite to start it again, or into a new --output")
    _read_rows(out)  # a damaged metrics.jsonl fails here, before any training


def _prepare(recipe: Recipe) -> _Prepared:
    from lighten.data import load_data

    torch.manual_seed(recipe.seed)
    data = load_data(recipe.data)
    model = _build(recipe, data)
    start = time.perf_counter()
    source = _load_baseline(model, recipe, data)
    return _Prepared(data, model, source, time.perf_counter() - start)


def _build(recipe: Recipe, data) -> nn.Module:
    from lighten.models import build_model

    spec_shape = getattr(recipe.model, "input_shape", None)
    if spec_shape and tuple(spec_shape) != tuple(data.input_shape):
        raise ModelError(f"model.input_shape {list(spec_shape)} does not match the data's "
                         f"{list(data.input_shape)}; fix model.input_shape or choose other data")
    # user data has as many classes as its largest label + 1: say so, a stray label is common
    source = (f"the data (its largest label is {data.num_classes - 1}, so {data.num_classes} "
              "classes; labels must run from 0 to classes - 1)"
              if recipe.data.python else "the data")
    # build_model runs the task's example inputs through the model and checks the outputs
    # (task.check_outputs: (2, classes) logits, or (2, T, V) for a language model)
    model = build_model(recipe.model, input_shape=tuple(data.input_shape),
                        num_classes=data.num_classes, classes_from=source, task=data.task)
    return model.eval()


def _load_baseline(model: nn.Module, recipe: Recipe, data) -> str | None:
    """Weights from the recipe, else the zoo's shipped checkpoint, else the cache; None when
    the baseline must be trained (:func:`_train_baseline`, once the output folder is set up)."""
    from lighten.models import load_weights, shipped_checkpoint

    if recipe.model.weights:  # build_model loaded them (a lighten artifact's model included)
        return f"weights {recipe.model.weights}"
    if recipe.model.zoo:
        shipped = shipped_checkpoint(recipe.model.zoo, data.name)
        if shipped is not None:
            load_weights(model, shipped)
            return f"shipped checkpoint {shipped.name}"
    cached = _cache_path(recipe)
    if cached.is_file():
        load_weights(model, cached)
        return f"cached checkpoint {cached}"
    return None


def _train_baseline(prepared: _Prepared, recipe: Recipe, out: Path, *, progress: bool) -> None:
    """Train the baseline, its state checkpointed at each epoch end in OUTPUT/BASELINE_CHECKPOINT
    so that ``--resume`` after an interrupt continues from the last finished epoch (to the same
    weights as an uninterrupted training); then cache it and drop the checkpoint."""
    from lighten import train_state
    from lighten.train import train

    model, data = prepared.model, prepared.data
    cfg = recipe.train.model_copy(update={"seed": recipe.seed})
    checkpoint = out / BASELINE_CHECKPOINT
    meta = train_state.read_meta(checkpoint)
    key = train_state.state_key(model, cfg.model_dump(), len(data.train))
    resumed = (f", continued after epoch {meta['epoch'] + 1}"
               if meta and meta.get("key") == key else "")
    start = time.perf_counter()
    train(model, data.train, cfg, progress=progress, task=data.task, checkpoint=checkpoint)
    model.eval()
    cached = _cache_path(recipe)
    _save_weights(model, cached)
    checkpoint.unlink(missing_ok=True)
    prepared.baseline_seconds = time.perf_counter() - start
    prepared.baseline_source = (f"trained here ({recipe.train.epochs} epochs{resumed}), cached "
                                f"at {cached}")


def _cache_path(recipe: Recipe) -> Path:
    from lighten.provenance import recipe_hash

    key = recipe_hash({"model": recipe.model.model_dump(), "data": recipe.data.model_dump(),
                       "train": recipe.train.model_dump(), "seed": recipe.seed,
                       "code": [_file_digest(recipe.model.python),
                                _file_digest(recipe.data.python)]})
    root = Path(os.environ.get("LIGHTEN_CACHE", Path.home() / ".cache" / "lighten"))
    label = recipe.model.zoo or "model"
    return root / "baselines" / f"{label}-{key}.safetensors"


def _file_digest(reference: str | None) -> str | None:
    """Hash of the user's code behind ``file.py:function``: editing the model retrains it."""
    if not reference:
        return None
    import hashlib

    path = Path(reference.rpartition(":")[0] or reference)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)


def _prepare_output(out: Path, *, fresh: bool) -> None:
    if fresh:
        for name in ("metrics.jsonl", "state.json", "run.json", "report.md", "report.html",
                     "latency.json", BASELINE_CHECKPOINT):
            (out / name).unlink(missing_ok=True)
        stages = out / "stages"
        if stages.is_dir():
            for old in [*stages.glob("*.safetensors"), *stages.glob("*.layers.json"),
                        *stages.glob("*.report.json")]:
                old.unlink()
    (out / "stages").mkdir(parents=True, exist_ok=True)


def _execute(recipe, prepared: _Prepared, out: Path, state, digest, recipe_dict, *, progress):
    from lighten.artifact import save_artifact
    from lighten.backends import get_backend
    from lighten.progress import line as progress_line
    from lighten.provenance import atomic_write_text, provenance
    from lighten.report import write_report

    data, model = prepared.data, prepared.model
    backend = get_backend(recipe.deploy.backend, threads=recipe.deploy.threads)
    model_spec = recipe.model.model_dump(exclude_none=True)
    done: list[str] = list(state["done"]) if state else []
    rows = _read_rows(out) if state else []
    rows = [r for r in rows if r["stage"] in done]
    notes: list[str] = list(state.get("notes", [])) if state else []
    target = _resumed_target(Target.from_deploy(recipe.deploy), recipe, state, notes)
    if "baseline" not in done:  # on resume the baseline comes from its artifact, noted before
        notes.append(f"baseline: {prepared.baseline_source}")
        if recipe.measure.robustness and not data.task.perturbable:
            notes.append(f"robustness probes skipped: noise and shifts perturb images, not the "
                         f"inputs of a {data.task.kind} task")
        if target.latency_note():
            notes.append(target.latency_note())
    prov = provenance(recipe_dict, recipe.seed, target=target)
    atomic_write_text(out / "run.json", json.dumps(
        {**_run_info(recipe, digest, prov, notes, data), "status": "running"}, indent=2))

    stage_names = ["baseline"] + _unique_stage_names(recipe)
    baseline_copy = _clone(model)
    reference = None
    for index, stage in enumerate(stage_names):
        artifact = out / "stages" / f"{index:02d}-{stage}.safetensors"
        if stage in done:
            if index == len(done) - 1:  # the last finished stage is where work continues
                model, model_spec = _load_finished(artifact, out)
            if index == 0:
                reference = _reference_logits(out)
                baseline_copy = _clone(_load_finished(artifact, out)[0])
            continue
        torch.manual_seed(recipe.seed + index)
        progress_line(f"stage {index + 1}/{len(stage_names)}: {stage}", enabled=progress)
        step = recipe.steps[index - 1] if index else None
        ctx = StepContext(data=data, train_config=recipe.train, baseline=baseline_copy,
                          workdir=out, seed=recipe.seed + index, progress=progress,
                          target=target)
        start = time.perf_counter()
        if step is not None:
            model, report = step_apply(step, model, ctx)
            model_spec = ctx.source_spec or model_spec
            atomic_write_text(artifact.with_suffix(".report.json"),
                              json.dumps(report.to_dict(), indent=1))
        seconds = prepared.baseline_seconds if step is None else time.perf_counter() - start
        notes.extend(ctx.notes)
        meta = {"recipe_hash": digest, "stage": stage, "provenance": prov,
                "task": data.task.describe(), "preprocessing": data.preprocessing(),
                "data": recipe.settings()["data"]}
        nbytes = save_artifact(model, artifact, model_spec=model_spec,
                               input_shape=list(data.input_shape),
                               num_classes=data.num_classes, task=data.task, meta=meta)
        _verify_reload(model, artifact, stage, data)
        if step is not None:
            _save_layer_table(model, artifact, out / "stages" / f"{index - 1:02d}-"
                              f"{stage_names[index - 1]}.safetensors", recipe, data)
        row, logits = _measure(model, stage, step, data, backend, reference, nbytes, seconds,
                               out, recipe, progress)
        if index == 0:
            reference = logits
            _save_reference(out, logits)
        rows.append(row)
        done.append(stage)
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out / "state.json", json.dumps(
            {"version": STATE_VERSION, "recipe_hash": digest, "done": done, "notes": notes,
             "recipe": recipe_dict, "target": target.to_dict()}))
    # latency of every stage (finished ones of a resumed run too), timed together, interleaved
    notes.append(_time_stages(rows, stage_names, backend, data, out, recipe, progress))
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "run.json", json.dumps(
        {**_run_info(recipe, digest, prov, notes, data), "status": "finished"}, indent=2))
    write_report(out)
    return RunResult(out, rows, notes)


def _resumed_target(target: Target, recipe: Recipe, state: dict | None,
                    notes: list[str]) -> Target:
    """``cpu: auto`` resolves to the machine that *started* the run: a run resumed elsewhere
    keeps building for the CPU its finished stages were built for (and says so)."""
    recorded = (state or {}).get("target") or {}
    cpu = recorded.get("cpu")
    if getattr(recipe.deploy, "cpu", "auto") != "auto" or not cpu or cpu == target.cpu:
        return target
    import dataclasses

    notes.append(f"resumed on a {target.cpu} machine; steps keep building for the run's "
                 f"recorded target cpu {cpu} (latency is measured on this machine)")
    return dataclasses.replace(target, cpu=cpu)


def _run_info(recipe: Recipe, digest: str, prov: dict, notes: list, data) -> dict:
    """run.json: the recipe as written, the resolved settings (every default, only the keys
    that apply), the data's preprocessing (input transform, class names), provenance, notes."""
    return {"recipe": recipe.as_written(), "settings": recipe.settings(), "recipe_hash": digest,
            "source": recipe.source, "preprocessing": data.preprocessing(), "provenance": prov,
            "notes": notes}


def _load_finished(artifact: Path, out: Path) -> tuple[nn.Module, dict]:
    """A finished stage read back for --resume (built from the source its manifest names) and
    that source; a damaged file says how to start over."""
    from lighten.artifact import load_artifact
    from lighten.errors import CheckpointError

    try:
        model, manifest = load_artifact(artifact)
        return model, manifest["model_spec"]
    except CheckpointError as err:
        reason = str(err).removesuffix("; re-save it")  # a stage is not re-saved by hand
        raise RecipeError(f"cannot resume the run in {out}: {reason}; rerun with --overwrite to "
                          "start it again, or into a new --output") from None


def _verify_reload(model: nn.Module, artifact: Path, stage: str, data) -> None:
    """Load the artifact just saved and compare its outputs with the in-memory model on real
    test samples: a stage that does not reload to the same model is an error, never a pass."""
    from lighten.artifact import load_artifact
    from lighten.errors import CheckpointError

    try:
        loaded, _ = load_artifact(artifact)  # from the source its manifest names, as users do
    except CheckpointError as err:
        raise CheckpointError(f"stage {stage}: its artifact does not load again ({err}); this "
                              "is a lighten bug, please report it with the recipe") from None
    diff = outputs_differ(model, loaded, _sample_inputs(data, 8))
    if diff is not None:
        raise CheckpointError(f"stage {stage}: the reloaded artifact {artifact.name} computes "
                              f"other outputs than the model that was saved ({diff}); this is a "
                              "lighten bug, please report it with the recipe")


def _sample_inputs(data, count: int):
    """The first ``count`` test inputs as one batch (a tensor, or a tuple for multi-input)."""
    from torch.utils.data import default_collate

    split = data.test if len(data.test) else data.train
    batch = default_collate([split[i] for i in range(min(count, len(split)))])
    return batch[0]


def outputs_differ(a: nn.Module, b: nn.Module, inputs, *, atol: float = 1e-5) -> str | None:
    """None when ``a`` and ``b`` give the same outputs on ``inputs``, else what differs."""
    args = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    with torch.no_grad():
        out_a, out_b = a.eval()(*args), b.eval()(*args)
    flat_a, flat_b = _flatten(out_a), _flatten(out_b)
    if len(flat_a) != len(flat_b):
        return f"{len(flat_a)} outputs against {len(flat_b)}"
    for i, (x, y) in enumerate(zip(flat_a, flat_b, strict=True)):
        if x.shape != y.shape:
            return f"output {i} is {tuple(x.shape)} against {tuple(y.shape)}"
        worst = (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
        scale = max(1.0, x.float().abs().max().item() if x.numel() else 0.0)
        if not worst <= atol * scale:  # NaN differences fail too
            return f"max |diff| {worst:.3g} in output {i}"
    return None


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    if isinstance(out, list | tuple):
        return [t for item in out for t in _flatten(item)]
    return []


def step_apply(step, model: nn.Module, ctx: StepContext):
    """One recipe step through the verb (``lighten.verb.run_step``): (model, Report)."""
    from lighten.verb import run_step

    return run_step(model, step.config, ctx)


def _save_layer_table(model: nn.Module, artifact: Path, previous: Path, recipe, data) -> None:
    """Per quantized layer: bits, scales, SQNR against the stage's input (the previous stage's
    artifact), on the first 128 test samples; written next to the artifact as .layers.json."""
    from lighten.artifact import load_artifact
    from lighten.quant.layer_report import has_quantized_layers, write_layer_table

    if len(data.test) == 0 or not has_quantized_layers(model):
        return
    before, _ = load_artifact(previous)
    from lighten.task import Inputs

    samples = data.task.as_inputs(_sample_inputs(data, 128))  # one tensor per model input
    batches = [Inputs(part) for part in zip(*(s.split(64) for s in samples), strict=True)]
    write_layer_table(artifact.with_suffix(".layers.json"), before, model, batches)


def _measure(model, stage, step, data, backend, reference, nbytes, seconds, out, recipe, progress):
    from lighten.measure import measure_stage

    compiled = _compile(model, backend, data, out / "deploy" / stage)
    return measure_stage(
        model, stage=stage, step=None if step is None else step.name, data=data,
        compiled=compiled, reference_logits=reference, artifact_bytes=nbytes, seconds=seconds,
        eval_limit=recipe.measure.eval_limit, robustness=recipe.measure.robustness,
        latency_runs=recipe.deploy.latency_runs, progress=progress,
        latency=False,  # every stage is timed at the end, together: _time_stages
    )


def _compile(model, backend, data, workdir: Path):
    """The stage's deployment, written to ``workdir`` (deploy/<stage>/) and self-checked."""
    from lighten.export import CHECK_BATCH, preprocessing_metadata, task_metadata

    workdir.mkdir(parents=True, exist_ok=True)
    samples = data.task.as_inputs(_sample_inputs(data, CHECK_BATCH))  # checked at b1 and b64
    return backend.compile(model, inputs=data.task.inputs, workdir=workdir,
                           sample_inputs=samples,
                           metadata={**task_metadata(data.task),
                                     **preprocessing_metadata(data.preprocessing())})


def _time_stages(rows, stage_names, backend, data, out, recipe, progress) -> str:
    """Time every stage's deployment together, in interleaved rounds
    (:func:`lighten.measure.timing.time_interleaved`, ``deploy.latency_runs`` timed runs per
    stage and batch size in all, the round orders seeded with the recipe's seed); fill
    ``latency_ms_b1/_b64`` (medians) and ``..._spread`` ([25th, 75th percentile] of the rounds)
    into ``rows``, write ``latency.json`` (every round's numbers, the orders, when); return the
    run note that says how the numbers were taken.

    The deployments are the files each stage's compile wrote to ``deploy/<stage>/`` (opened
    again, not re-exported); where a backend writes none (torch) or the files are gone, the
    stage's artifact is loaded and compiled."""
    from lighten.measure.timing import time_interleaved
    from lighten.provenance import atomic_write_text

    compiled = []
    for index, stage in enumerate(stage_names):
        workdir = out / "deploy" / stage
        deployed = backend.load(workdir, inputs=data.task.inputs)
        if deployed is None:
            model, _ = _load_finished(out / "stages" / f"{index:02d}-{stage}.safetensors", out)
            deployed = _compile(model, backend, data, workdir)
        compiled.append(deployed)
    timing = time_interleaved(compiled, runs=recipe.deploy.latency_runs, seed=recipe.seed,
                              progress=progress)
    by_stage = {row["stage"]: row for row in rows}
    for index, stage in enumerate(stage_names):
        by_stage[stage].update(timing.row_fields(index))
    atomic_write_text(out / "latency.json", json.dumps(timing.to_dict(stage_names), indent=1))
    return (f"latency: all {len(stage_names)} stages timed together after the last one, in "
            f"{timing.rounds} interleaved rounds of {timing.runs_per_round} run(s) per stage and "
            "batch size (order shuffled per round, seeded); shown: the median of the rounds ± "
            "half their interquartile range; '≈' where a stage's range overlaps the baseline's")


def _unique_stage_names(recipe: Recipe) -> list[str]:
    names, seen = [], {}
    for step in recipe.steps:
        seen[step.name] = seen.get(step.name, 0) + 1
        names.append(step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}")
    return names


def _clone(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _save_reference(out: Path, logits: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = out / "reference_logits.tmp"
    save_file({"logits": logits.contiguous()}, str(tmp))
    os.replace(tmp, out / "reference_logits.safetensors")


def _reference_logits(out: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(out / "reference_logits.safetensors"))["logits"]


def _read_state(out: Path) -> dict | None:
    path = out / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("done"), list):
        raise RecipeError(f"{path} is corrupt; rerun with --overwrite to start the run again, "
                          "or choose another --output")
    return state if state.get("version") == STATE_VERSION else None


def _read_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        rows = None
    if rows is None or not all(isinstance(r, dict) and "stage" in r for r in rows):
        raise RecipeError(f"{path} is corrupt; rerun with --overwrite to start the run again, "
                          "or choose another --output")
    return rows
