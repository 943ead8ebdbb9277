"""Per-module table: what fx tracing, MAC counting, ONNX export, pruning and int8 make of MODEL.

Run it before writing a recipe: a "no" names the module and the reason.
"""

from __future__ import annotations

HELP = "show per module what can be traced, measured, exported, pruned, quantized"


def add_arguments(parser) -> None:
    from lighten.cli.model_ref import add_model_arguments

    add_model_arguments(parser)


def run(args) -> int:
    from lighten.check import check_model, format_check
    from lighten.cli.model_ref import resolve_model

    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes)
    print(f"{resolved.label}: input {list(resolved.input_shape)}, "
          f"{resolved.num_classes} classes\n")
    print(format_check(check_model(resolved.model, resolved.input_shape)))
    return 0
