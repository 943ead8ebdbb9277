"""Per-module table: what fx tracing, MAC counting, ONNX export, pruning and int8 make of MODEL.

Run it before writing a recipe: a "no" names the module and the reason. The example input comes
from the model's task (int64 token ids for a language model).
"""

from __future__ import annotations

HELP = "show per module what can be traced, measured, exported, pruned, quantized"


def add_arguments(parser) -> None:
    from lighten.cli.model_ref import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--data", metavar="TEXT",
                        help="file.py:factory language models: the text file whose vocabulary "
                             "the model is built for (vocab_size, seq_len = --input-shape)")


def run(args) -> int:
    from lighten.check import check_model, format_check
    from lighten.cli.model_ref import describe_task, resolve_model
    from lighten.errors import UnsupportedError

    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes, data=args.data,
                             trust=args.trust)
    task = resolved.task
    if len(task.inputs) != 1:
        names = ", ".join(s.name for s in task.inputs)
        raise UnsupportedError(f"lighten check runs models with one input; {resolved.label} "
                               f"takes {len(task.inputs)} ({names}); `lighten export` and "
                               "`lighten measure` take it")
    print(f"{resolved.label}: {describe_task(task)}\n")
    (example,) = task.example_inputs(1)
    print(format_check(check_model(resolved.model, resolved.input_shape, example=example)))
    return 0
