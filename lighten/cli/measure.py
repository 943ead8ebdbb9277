"""Measure MODEL as deployed: accuracy on test data, size, MACs, latency, energy, robustness.

Uses the same measurement as every recipe stage, so numbers are comparable with `lighten run`.
What is measured follows the model's task: a language model (an artifact of a text recipe, or
file.py:factory with --data corpus.txt) reports perplexity and next-token accuracy on --data.
"""

from __future__ import annotations

HELP = "measure accuracy, size, MACs and latency of MODEL on a backend"


def add_arguments(parser) -> None:
    from lighten.backends import BACKENDS, DEFAULT_BACKEND
    from lighten.cli.model_ref import DATA_HELP, add_model_arguments, positive_int

    add_model_arguments(parser)
    parser.add_argument("--data", metavar="DATA", help=DATA_HELP)
    parser.add_argument("--backend", choices=tuple(BACKENDS), default=DEFAULT_BACKEND,
                        help=f"runtime to time and evaluate on (default: {DEFAULT_BACKEND})")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="pin the backend's threads")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="evaluate the first N test samples")
    parser.add_argument("--latency-runs", type=positive_int, default=50, metavar="N",
                        help="timed runs per batch size (default 50)")
    parser.add_argument("--no-robustness", action="store_true", help="skip noise/shift accuracy")
    parser.add_argument("--json", action="store_true", help="print the metrics row as JSON")


def run(args) -> int:
    import json
    import tempfile
    from pathlib import Path

    from lighten.cli.model_ref import load_data_for, resolve_model
    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes, data=args.data,
                             trust=args.trust)
    data = load_data_for(args.data, resolved)
    task = resolved.task

    from lighten.artifact import save_artifact
    from lighten.backends import get_backend
    from lighten.measure import measure_stage
    from lighten.report import format_stage_table

    backend = get_backend(args.backend, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="lighten-measure-") as tmp:
        workdir = Path(tmp)
        if resolved.artifact is not None:
            nbytes = resolved.artifact.stat().st_size
        else:  # size as lighten would store it, so it compares with `lighten run` stages
            nbytes = save_artifact(resolved.model, workdir / "model.safetensors",
                                   model_spec=resolved.spec,
                                   input_shape=list(resolved.input_shape),
                                   num_classes=data.num_classes, task=task, meta={})
        compiled = backend.compile(resolved.model, inputs=task.inputs, workdir=workdir,
                                   sample_inputs=_test_inputs(data, 64))
        row, _ = measure_stage(
            resolved.model, stage=resolved.label, step=None, data=data, compiled=compiled,
            reference_logits=None, artifact_bytes=nbytes, seconds=0.0, eval_limit=args.limit,
            robustness=not args.no_robustness, latency_runs=args.latency_runs, progress=False,
        )
    print(json.dumps(row, indent=2) if args.json else format_stage_table([row]))
    return 0


def _test_inputs(data, count: int):
    """The first ``count`` test inputs, one batch per model input (the export check runs them)."""
    from torch.utils.data import default_collate

    if len(data.test) == 0:
        return None
    x, _ = default_collate([data.test[i] for i in range(min(count, len(data.test)))])
    return data.task.as_inputs(x)
