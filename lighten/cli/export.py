"""Export MODEL to ONNX and check it in ONNX Runtime against PyTorch before writing the file.

The model's task decides the graph's inputs (one float ``input``; a language model's int64 token
ids; a ``python:`` task's named inputs) and is written into the file's metadata_props
(``lighten.task``, ``lighten.inputs``, a language model's ``lighten.tokenizer``), so the file
alone says how to feed it.
"""

from __future__ import annotations

HELP = "export MODEL to a verified ONNX file"


def add_arguments(parser) -> None:
    from lighten.cli.model_ref import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--onnx", required=True, metavar="PATH", help="where to write the .onnx")
    parser.add_argument("--data", metavar="TEXT",
                        help="file.py:factory language models: the text file whose vocabulary "
                             "the model is built for (vocab_size, seq_len = --input-shape)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the ONNX Runtime comparison (not recommended)")


def run(args) -> int:
    from lighten.cli.model_ref import describe_task, resolve_model
    from lighten.export import export_onnx, onnx_inputs, task_metadata
    from lighten.report import human_bytes

    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes, data=args.data)
    task = resolved.task
    check = export_onnx(resolved.model, args.onnx, inputs=task.inputs,
                        metadata=task_metadata(task), verify=not args.no_verify)
    print(f"wrote {check.path} ({human_bytes(check.bytes)}"
          f"{', int8 weights' if check.folded_weights else ''})")
    print(f"task: {describe_task(task)}")
    for spec in onnx_inputs(task.inputs):
        print(f"  input {spec['name']}: {spec['dtype']} {spec['shape']}")
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer:
        vocab = tokenizer.get("vocab")
        print(f"  tokenizer: {tokenizer.get('kind')}"
              f"{f' ({len(vocab)} symbols)' if vocab else ''}; in metadata_props")
    if check.max_abs_diff is not None:
        print(f"ONNX Runtime vs PyTorch: max |diff| {check.max_abs_diff:.2e}, "
              f"top-1 agreement {100 * check.agreement:.1f}%")
    return 0
