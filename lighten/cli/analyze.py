"""Analyze MODEL: per-layer pruning sensitivity (prune each layer alone, measure accuracy; a
language model's next-token accuracy on the --data text).

Writes sensitivity.csv, sensitivity.md and sensitivity.png to --output; with --target-sparsity
also derives non-uniform per-layer ratios (ratios.json) usable as `prune.magnitude: {ratios: ...}`.
With --structured, each channel group is removed physically instead (channel_sensitivity.*):
the table `prune.channels: {ratios: auto}` spends its MAC budget by.
"""

from __future__ import annotations

HELP = "per-layer pruning sensitivity of MODEL: table, plot, derived ratios"


def _ratios(text: str) -> tuple[float, ...]:
    import argparse

    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of fractions in [0, 1); "
                                         "write e.g. 0.3,0.5,0.7,0.9")
    return values


def _fraction(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1), e.g. 0.8")
    return value


def add_arguments(parser) -> None:
    from lighten.cli.model_ref import DATA_HELP, add_model_arguments, positive_int

    add_model_arguments(parser)
    parser.add_argument("--sensitivity", action="store_true",
                        help="prune each layer alone at each ratio and measure accuracy")
    parser.add_argument("--structured", action="store_true",
                        help="with --sensitivity: remove channel groups (prune.channels) "
                        "instead of zeroing single weights")
    parser.add_argument("--data", metavar="DATA", help=DATA_HELP)
    parser.add_argument("--ratios", type=_ratios, default=(0.3, 0.5, 0.7, 0.9),
                        metavar="R,R,...", help="fractions pruned (default 0.3,0.5,0.7,0.9)")
    parser.add_argument("--limit", type=positive_int, default=1000, metavar="N",
                        help="evaluate on the first N test samples (default 1000)")
    parser.add_argument("--ignore", nargs="+", default=[], metavar="LAYER",
                        help="layers left out of the analysis")
    parser.add_argument("--target-sparsity", type=_fraction, metavar="S",
                        help="also derive per-layer ratios reaching overall sparsity S")
    parser.add_argument("--max-drop", type=_fraction, metavar="D",
                        help="with --target-sparsity: no layer may lose more than D accuracy")
    parser.add_argument("--output", default="analysis", metavar="DIR",
                        help="folder for the table and plot (default ./analysis)")


def run(args) -> int:
    import json
    from pathlib import Path

    from lighten.cli.model_ref import load_data_for, resolve_model
    from lighten.errors import LightenError, UnsupportedError

    if not args.sensitivity:
        raise LightenError("nothing to analyze; add --sensitivity")
    if args.max_drop is not None and args.target_sparsity is None:
        raise LightenError("--max-drop bounds the ratios --target-sparsity derives; add "
                           "--target-sparsity S, or leave --max-drop out")
    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes, data=args.data,
                             trust=args.trust)
    from lighten.quant.layer_report import has_quantized_layers

    if has_quantized_layers(resolved.model):
        raise UnsupportedError(f"{args.model} is quantized: sensitivity prunes float weights; "
                               "analyze the float model it was made from (the run's earlier "
                               "stage)")
    data = load_data_for(args.data, resolved)

    out = Path(args.output)
    if args.structured:
        if args.target_sparsity is not None:
            raise LightenError("--target-sparsity derives unstructured ratios; with --structured "
                               "use prune.channels: {target_macs: ..., ratios: auto} in a recipe")
        from lighten.prune.channel_sensitivity import analyze_channels

        if len(data.task.inputs) != 1:
            raise UnsupportedError(f"--structured traces channel groups from one example "
                                   f"input; {resolved.label} takes {len(data.task.inputs)}: "
                                   "drop --structured (per-layer sensitivity works)")
        groups = analyze_channels(resolved.model, data, ratios=args.ratios,
                                  eval_limit=args.limit, ignore=args.ignore, progress=True)
        paths = groups.write(out)
        print(groups.to_markdown())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0

    from lighten.prune.sensitivity import analyze, derive_ratios

    table = analyze(resolved.model, data, ratios=args.ratios, eval_limit=args.limit,
                    ignore=args.ignore, progress=True)
    paths = table.write(out)
    print(table.to_markdown())
    if args.target_sparsity is not None:
        ratios = derive_ratios(table, args.target_sparsity, max_drop=args.max_drop)
        paths["ratios"] = out / "ratios.json"
        paths["ratios"].write_text(json.dumps({k: round(v, 4) for k, v in ratios.items()},
                                              indent=2) + "\n")
        print(f"per-layer ratios for overall sparsity {args.target_sparsity:g}:")
        for layer, ratio in ratios.items():
            print(f"  {layer}: {ratio:.3f}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
