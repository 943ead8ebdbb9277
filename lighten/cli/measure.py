"""Measure MODEL as deployed: accuracy on test data, size, MACs, latency, energy, robustness.

Uses the same measurement as every recipe stage, so numbers are comparable with `lighten run`.
"""

from __future__ import annotations

HELP = "measure accuracy, size, MACs and latency of MODEL on a backend"


def add_arguments(parser) -> None:
    from lighten.backends import BACKENDS, DEFAULT_BACKEND
    from lighten.cli.model_ref import DATA_CHOICES, add_model_arguments, positive_int

    add_model_arguments(parser)
    parser.add_argument("--data", choices=DATA_CHOICES,
                        help="test data (default: the built-in dataset matching the input shape)")
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

    from lighten.cli.model_ref import default_data, load_data_for, resolve_model
    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes, data=args.data)
    data = load_data_for(args.data or default_data(resolved.input_shape), resolved)

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
                                   num_classes=data.num_classes, meta={})
        compiled = backend.compile(resolved.model, input_shape=tuple(resolved.input_shape),
                                   workdir=workdir)
        row, _ = measure_stage(
            resolved.model, stage=resolved.label, step=None, data=data, compiled=compiled,
            reference_logits=None, artifact_bytes=nbytes, seconds=0.0, eval_limit=args.limit,
            robustness=not args.no_robustness, latency_runs=args.latency_runs, progress=False,
        )
    print(json.dumps(row, indent=2) if args.json else format_stage_table([row]))
    return 0
