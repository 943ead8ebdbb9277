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
    parser.add_argument("--width", type=float, metavar="W",
                        help="a dynamic.slimmable model: write the plain model of width W only "
                             "(e.g. 0.5; one of the widths it was trained for)")
    parser.add_argument("--kv-cache", action="store_true",
                        help="language models (hf decoders): a generation graph with past/present "
                             "key-value inputs/outputs; 4-bit llm.weight_only layers become ORT "
                             "MatMulNBits (lighten.llm.onnx_decoder)")
    parser.add_argument("--accuracy-level", type=int, choices=range(5), default=0,
                        metavar="L",
                        help="with --kv-cache: MatMulNBits compute type (0: float32, matches "
                             "PyTorch; 4: int8 activations per block, about 1.5x the tokens/s "
                             "here at a little more perplexity)")
    parser.add_argument("--table-bits", type=int, choices=(4, 8), metavar="B",
                        help="with --kv-cache: store the embedding table and the LM head (one "
                             "copy when tied) as B-bit rows, gathered for the lookup and "
                             "multiplied by MatMulNBits (default: float32 as in the model)")
    parser.add_argument("--bits", type=int, metavar="B",
                        help="a dynamic.any_precision artifact: export its B-bit model (one of "
                             "its trained precisions; default: the saved one)")


def run(args) -> int:
    from lighten.cli.model_ref import describe_task, resolve_model
    from lighten.errors import LightenError
    from lighten.export import export_onnx, onnx_inputs, preprocessing_metadata, task_metadata
    from lighten.models.checkpoint import artifact_manifest
    from lighten.report import human_bytes

    decoder_only = [flag for flag, given in (("--accuracy-level", args.accuracy_level != 0),
                                             ("--table-bits", args.table_bits is not None))
                    if given]
    if decoder_only and not getattr(args, "kv_cache", False):
        raise LightenError(f"{', '.join(decoder_only)} applies to the --kv-cache decoder graph "
                           "only; add --kv-cache (a language model) or leave it out")
    resolved = resolve_model(args.model, input_shape=args.input_shape, weights=args.weights,
                             num_classes=args.num_classes, data=args.data,
                             trust=args.trust)
    task = resolved.task
    if getattr(args, "bits", None) is not None:  # dynamic.any_precision: one of its widths
        from lighten.dynamic.any_precision import select_precision

        select_precision(resolved.model, args.bits)
    if getattr(args, "kv_cache", False):
        return _export_decoder(args, resolved)
    manifest = (artifact_manifest(resolved.artifact or args.weights or "") or {})
    meta = manifest.get("meta") or {}
    samples, source, pre = (None, "", {}) if args.no_verify else _check_data(args, resolved, meta)
    pre = meta.get("preprocessing") or pre
    model = resolved.model
    if args.width is not None:  # one width of a slimmable model, weights physically sliced
        from lighten.dynamic.slimmable_runtime import plain_width

        model = plain_width(model, args.width)
        print(f"width {args.width:g}: the plain model of that width")
    check = export_onnx(model, args.onnx, inputs=task.inputs, sample_inputs=samples,
                        metadata={**task_metadata(task), **preprocessing_metadata(pre)},
                        verify=not args.no_verify)
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
    transform = pre.get("transform") or "not recorded (export a run's stage, or pass --data)"
    print(f"input transform: {transform}")
    if pre.get("class_names"):
        print(f"classes: {', '.join(pre['class_names'])}")
    if check.by_batch:
        for batch, (diff, agree) in sorted(check.by_batch.items()):
            print(f"ONNX Runtime vs PyTorch, batch {batch}: max |diff| {diff:.2e}, "
                  f"top-1 agreement {100 * agree:.1f}%")
        print(f"  checked on {source}")
    return 0


CHECK_SAMPLES = 64


def _export_decoder(args, resolved) -> int:
    from lighten.export import task_metadata
    from lighten.llm.onnx_decoder import export_decoder
    from lighten.report import human_bytes

    done = export_decoder(resolved.model, args.onnx, verify=not args.no_verify,
                          accuracy_level=args.accuracy_level,
                          # int8 activations (level 4) and 16-bit floats (levels 1-3) move
                          # deep models' logits by percents, not 1e-3
                          rtol=1e-3 if args.accuracy_level == 0 else 0.25,
                          metadata=task_metadata(resolved.task), table_bits=args.table_bits)
    print(f"wrote {done.path} ({human_bytes(done.bytes)}): {done.summary()}")
    return 0


def _check_data(args, resolved, meta: dict):
    """(real test inputs for the self-check or None, where they came from, the data's
    preprocessing): --data, else the data recorded in the artifact (a run's stage), else none
    (random inputs, said so)."""
    from torch.utils.data import default_collate

    from lighten.cli.model_ref import load_data_for
    from lighten.data import DataSpec, load_data
    from lighten.errors import LightenError

    recorded = meta.get("data") if isinstance(meta.get("data"), dict) else None
    if args.data is not None:
        data, where = load_data_for(args.data, resolved), f"--data {args.data}"
    elif recorded:
        where = f"the run's data ({recorded.get('name') or recorded.get('python')})"
        try:
            data = load_data(DataSpec(**recorded))
        except (LightenError, ValueError) as err:  # e.g. Fashion-MNIST not on this machine
            first = (str(err).splitlines() or [""])[0]
            return None, f"random inputs: {where} is not available here ({first})", {}
    else:
        return None, "random inputs: no data (pass --data to check on real samples)", {}
    split = data.test if len(data.test) else data.train
    x, _ = default_collate([split[i] for i in range(min(CHECK_SAMPLES, len(split)))])
    samples = resolved.task.as_inputs(x)
    count = len(samples[0])  # a batch per model input: its rows are the samples
    return samples, f"{count} real test samples of {where}", data.preprocessing()
