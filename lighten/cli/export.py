"""Export MODEL to ONNX and check it in ONNX Runtime against PyTorch before writing the file."""

from __future__ import annotations

HELP = "export MODEL to a verified ONNX file"


def add_arguments(parser) -> None:
    from lighten.cli.model_ref import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--onnx", required=True, metavar="PATH", help="where to write the .onnx")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the ONNX Runtime comparison (not recommended)")


def run(args) -> int:
    from lighten.cli.model_ref import resolve_model
    from lighten.export import export_onnx
    from lighten.report import human_bytes

    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes)
    check = export_onnx(resolved.model, args.onnx, input_shape=resolved.input_shape,
                        verify=not args.no_verify)
    print(f"wrote {check.path} ({human_bytes(check.bytes)}"
          f"{', int8 weights' if check.folded_weights else ''})")
    if check.max_abs_diff is not None:
        print(f"ONNX Runtime vs PyTorch: max |diff| {check.max_abs_diff:.2e}, "
              f"top-1 agreement {100 * check.agreement:.1f}%")
    return 0
