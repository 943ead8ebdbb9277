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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lighten.baseline import Prepared, prepare, train_baseline
from lighten.errors import RecipeError
from lighten.recipe import Recipe
from lighten.run_folder import (
    STATE_VERSION,
    check_not_foreign,
    check_output_dir,
    check_recipe_change,
    check_resumable,
    load_finished,
    prepare_output,
    read_rows,
    read_state,
    reference_logits,
    resumed_target,
    run_lock,
    save_reference,
    unique_stage_names,
)
from lighten.step import StepContext
from lighten.target import Target


@dataclass
class RunResult:
    output_dir: Path
    rows: list[dict]
    notes: list[str] = field(default_factory=list)


def run_recipe(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    output: str | Path | None = None,
    max_memory: str | int | None = None,
) -> RunResult:
    """Run ``recipe``; with ``resume`` continue after the last finished stage. With
    ``max_memory`` (e.g. ``"2GB"``) training, calibration and evaluation fit that much resident
    memory or are refused before they start (:mod:`lighten.memory`)."""
    from lighten.memory import memory_budget

    with memory_budget(max_memory):
        return _run_recipe(recipe, resume=resume, overwrite=overwrite, progress=progress,
                           output=output)


def _run_recipe(recipe: Recipe, *, resume: bool, overwrite: bool, progress: bool,
                output: str | Path | None) -> RunResult:
    out = Path(output or recipe.output)
    check_output_dir(out)
    if not overwrite:
        check_not_foreign(out)
    with run_lock(out):
        return _run_in(recipe, out, resume=resume, overwrite=overwrite, progress=progress)


def _run_in(recipe: Recipe, out: Path, *, resume: bool, overwrite: bool,
            progress: bool) -> RunResult:
    """The run itself, in ``out``, which this process holds (:func:`run_lock`)."""
    from lighten.memory import fit_training_batch
    from lighten.provenance import recipe_hash
    from lighten.verify import run_finished

    recipe_dict = recipe.to_dict()
    digest = recipe_hash(recipe_dict)
    state = None if overwrite and not resume else read_state(out)  # --overwrite: any state
    if state and not resume and not overwrite:
        raise RecipeError(f"{out} already holds a run; pass --resume to continue it or choose "
                          f"another --output (or --overwrite to replace it)")
    if resume and state and state.get("recipe_hash") != digest:
        check_recipe_change(out, state, recipe_dict)
    if not (resume and state):
        state = None
    if state:
        check_resumable(out, state, recipe)
        if (len(state["done"]) == len(recipe.steps) + 1 and state.get("recipe_hash") == digest
                and run_finished(out)):
            return RunResult(out, read_rows(out), list(state.get("notes", [])))  # all done:
            # nothing is re-run or rewritten (run.json keeps its time); a run killed while
            # timing its stages or writing its report goes on to do that below

    prepared = prepare(recipe)  # all user-input errors surface here (weights too; no training)
    _check_first_step_names(recipe, prepared.model)
    # under --max-memory: refused now if the model cannot train even one sample at a time
    fit_training_batch(prepared.model, prepared.data.task.example_inputs, 1,
                       optimizer=recipe.train.optimizer, what="this run")
    prepare_output(out, fresh=state is None)
    if state is None:  # the run record comes first: a long baseline training is a run already
        _write_started(out, recipe, digest, recipe_dict, prepared.data)
    if prepared.baseline_source is None and not (state and "baseline" in state["done"]):
        train_baseline(prepared, recipe, out, progress=progress)
    return _execute(recipe, prepared, out, state, digest, recipe_dict, progress=progress)


def _check_first_step_names(recipe: Recipe, model: nn.Module) -> None:
    """The first step's ``ignore:`` names modules of the model as built: a typo is refused
    before the baseline trains, not after. (Later steps see a model earlier steps changed.)"""
    from lighten.modules import require_modules

    if not recipe.steps:
        return
    step = recipe.steps[0]
    ignore = getattr(step.config, "ignore", None)
    if not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
        return
    from lighten.unfused import STOCK_TYPES, unfuse_

    if any(isinstance(m, STOCK_TYPES) for m in model.modules()):
        import copy

        # steps unfuse PyTorch's transformer blocks first: their inner names count too
        model = copy.deepcopy(model)
        unfuse_(model)
    require_modules(model, ignore, key=f"steps[0].{step.name}.ignore")


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


def _execute(recipe, prepared: Prepared, out: Path, state, digest, recipe_dict, *, progress):
    from lighten.artifact import save_artifact
    from lighten.backends import get_backend
    from lighten.modules import bake_parametrizations_
    from lighten.progress import line as progress_line
    from lighten.provenance import atomic_write_text, provenance
    from lighten.report import write_report
    from lighten.verify import write_checksums

    data, model = prepared.data, prepared.model
    backend = get_backend(recipe.deploy.backend, threads=recipe.deploy.threads)
    model_spec = recipe.model.model_dump(exclude_none=True)
    done: list[str] = list(state["done"]) if state else []
    rows = read_rows(out) if state else []
    rows = [r for r in rows if r["stage"] in done]
    notes: list[str] = list(state.get("notes", [])) if state else []
    target = resumed_target(Target.from_deploy(recipe.deploy), recipe, state, notes)
    if "baseline" not in done:  # on resume the baseline comes from its artifact, noted before
        notes.append(f"baseline: {prepared.baseline_source}")
        notes.extend(shared_norm_notes(model, data.task.example_inputs(2)))
        baked = bake_parametrizations_(model)  # trained with them; deployed as plain weights
        if baked:  # (spectral_norm's power iteration does not even export to ONNX)
            notes.append(f"baseline: parametrized {', '.join(baked[:3])}"
                         f"{' ...' if len(baked) > 3 else ''} folded into plain weights after "
                         "training (weight_norm / spectral_norm: the weight each layer computes "
                         "with)")
        if recipe.measure.robustness and not data.task.perturbable:
            notes.append(f"robustness probes skipped: noise and shifts perturb images, not the "
                         f"inputs of a {data.task.kind} task")
        if target.latency_note():
            notes.append(target.latency_note())
    prov = provenance(recipe_dict, recipe.seed, target=target)
    atomic_write_text(out / "run.json", json.dumps(
        {**_run_info(recipe, digest, prov, notes, data), "status": "running"}, indent=2))

    stage_names = ["baseline"] + unique_stage_names(recipe)
    baseline_copy = _clone(model)
    reference = None
    for index, stage in enumerate(stage_names):
        artifact = out / "stages" / f"{index:02d}-{stage}.safetensors"
        if stage in done:
            if index == len(done) - 1:  # the last finished stage is where work continues
                model, model_spec = load_finished(artifact, out)
            if index == 0:
                reference = reference_logits(out)
                baseline_copy = _clone(load_finished(artifact, out)[0])
            continue
        torch.manual_seed(recipe.seed + index)
        progress_line(f"stage {index + 1}/{len(stage_names)}: {stage}", enabled=progress)
        step = recipe.steps[index - 1] if index else None
        ctx = StepContext(data=data, train_config=recipe.train, baseline=baseline_copy,
                          workdir=out, seed=recipe.seed + index, progress=progress,
                          target=target, model_spec=model_spec,
                          baseline_spec=recipe.model.model_dump(exclude_none=True))
        start = time.perf_counter()
        peak_mib = prepared.baseline_peak_mib
        if step is not None:
            model, report = step_apply(step, model, ctx)
            peak_mib = report.summary.get("peak_memory_mib")
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
            save_reference(out, logits)
        if peak_mib is not None:  # training / calibration of this stage (not its measuring)
            row["peak_memory_mib"] = round(peak_mib, 1)
        rows.append(row)
        if step is not None and (fell := drop_note(rows[-2], row, step, data.task)):
            notes.append(fell)
        done.append(stage)
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out / "state.json", json.dumps(
            {"version": STATE_VERSION, "recipe_hash": digest, "done": done, "notes": notes,
             "recipe": recipe_dict, "target": target.to_dict()}))
        write_checksums(out)  # `lighten verify OUTPUT`
    # latency of every stage (finished ones of a resumed run too), timed together, interleaved
    notes.append(_time_stages(rows, stage_names, backend, data, out, recipe, progress))
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "run.json", json.dumps(
        {**_run_info(recipe, digest, prov, notes, data), "status": "finished"}, indent=2))
    write_report(out)
    write_checksums(out, finished=True)  # the last write: the run is complete
    return RunResult(out, rows, notes)


def shared_norm_notes(model: nn.Module, inputs: tuple) -> list[str]:
    """A BatchNorm called at several places of one forward keeps one set of running statistics
    for activations of different distributions: trained, it evaluates wrongly (often at chance),
    a PyTorch pitfall worth naming."""
    from torch.nn.modules.batchnorm import _BatchNorm

    calls: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(
        name, calls.get(name, 0) + 1))
        for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    except Exception:  # noqa: BLE001 - a model that cannot run is reported elsewhere
        return []
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [f"{name} ({n} calls per forward): one BatchNorm at several places shares running "
            "statistics between them, so it evaluates wrongly once trained; give each place "
            "its own BatchNorm" for name, n in calls.items() if n > 1]


ACCURACY_DROP_NOTED = 0.05  # 5 points of accuracy (or 10% of another primary metric)


def drop_note(before: dict, after: dict, step, task) -> str | None:
    """A note when a stage lost much of its input's primary metric, with what usually helps:
    a step run without fine-tuning is the common cause (``lowrank.svd {rank: auto}``)."""
    key = task.primary
    old, new = before.get(key), after.get(key)
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return None
    worse = (old - new) if task.higher_is_better else (new - old)
    if worse <= 0:
        return None
    if key == "accuracy":
        if worse < ACCURACY_DROP_NOTED:
            return None
        change = f"{worse * 100:.1f} points ({old:.2%} -> {new:.2%})"
    else:
        if worse < 0.1 * abs(old):
            return None
        change = f"from {old:.4g} to {new:.4g}"
    finetune = getattr(step.config, "finetune", "absent")
    if finetune is None or getattr(finetune, "epochs", None) == 0:
        hint = "give the step finetune: {epochs: 2} to recover, or a gentler setting"
    elif finetune == "absent":
        hint = "choose a gentler setting, or follow the step with one that fine-tunes"
    else:
        hint = "fine-tune longer, or choose a gentler setting"
    return f"{step.name}: {key} fell {change}; {hint}"


def _run_info(recipe: Recipe, digest: str, prov: dict, notes: list, data) -> dict:
    """run.json: the recipe as written, the resolved settings (every default, only the keys
    that apply), the data's preprocessing (input transform, class names), provenance, notes."""
    return {"recipe": recipe.as_written(), "settings": recipe.settings(), "recipe_hash": digest,
            "source": recipe.source, "preprocessing": data.preprocessing(), "provenance": prov,
            # python: files outside the recipe's folder that the run imported (and so ran)
            "code_outside_recipe_folder": recipe.code_outside(), "notes": notes}


def _verify_reload(model: nn.Module, artifact: Path, stage: str, data) -> None:
    """Load the artifact just saved and compare its outputs with the in-memory model on real
    test samples: a stage that does not reload to the same model is an error, never a pass."""
    from lighten.artifact import load_artifact
    from lighten.errors import CheckpointError

    try:
        # from the source its manifest names, as users do (this run wrote it: trusted)
        loaded, _ = load_artifact(artifact, trust=True)
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
    before, _ = load_artifact(previous, trust=True)  # this run's previous stage
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
        workdir=out / "deploy" / stage,
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
    from lighten.dynamic.runtime import keep_dynamic_latency
    from lighten.measure.timing_worker import time_in_fresh_process
    from lighten.provenance import atomic_write_text

    workdirs = [out / "deploy" / stage for stage in stage_names]
    timing = time_in_fresh_process(backend.name, getattr(backend, "threads", None), workdirs,
                                   data.task.inputs, runs=recipe.deploy.latency_runs,
                                   seed=recipe.seed)
    where = "in a fresh process that opens only the deployment files"
    if timing is None:
        timing = _time_here(stage_names, backend, data, out, recipe, progress)
        where = "in the run's own process"
    by_stage = {row["stage"]: row for row in rows}
    for index, stage in enumerate(stage_names):
        by_stage[stage].update(timing.row_fields(index))
        keep_dynamic_latency(by_stage[stage])  # a dynamic stage: its runtime's batch-1 time
    atomic_write_text(out / "latency.json", json.dumps(timing.to_dict(stage_names), indent=1))
    return (f"latency: all {len(stage_names)} stages timed together after the last one, {where}, "
            f"in {timing.rounds} interleaved rounds of {timing.runs_per_round} run(s) per stage "
            "and batch size (order shuffled per round, seeded); shown: the median of the rounds "
            "± half their interquartile range; speed: the median of same-round ratios to the "
            "baseline, '≈' where their interquartile range holds 1")


def _time_here(stage_names, backend, data, out: Path, recipe, progress):
    """The in-process timing, for backends without deployment files (torch) or when the fresh
    process cannot run: stages reopened from deploy/, else rebuilt from their artifacts."""
    from lighten.measure.timing import time_interleaved

    compiled = []
    for index, stage in enumerate(stage_names):
        workdir = out / "deploy" / stage
        deployed = backend.load(workdir, inputs=data.task.inputs)
        if deployed is None:
            model, _ = load_finished(out / "stages" / f"{index:02d}-{stage}.safetensors", out)
            deployed = _compile(model, backend, data, workdir)
        compiled.append(deployed)
    return time_interleaved(compiled, runs=recipe.deploy.latency_runs, seed=recipe.seed,
                            progress=progress)


def _clone(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone

