"""Int8 PTQ side by side with its peers on Fashion-MNIST: ours vs ONNX Runtime `quantize_static`
vs NNCF -> OpenVINO vs plain torch.ao FX, each on its own runtime and (where the file format
allows) on the others.

    python benchmarks/quant_peers.py [--models lenet5 resnet20] [--threads 2] [--calib 512]
                                     [--out DIR]

Every method gets the same float checkpoint and the same calibration samples (the first
``--calib`` training images). Accuracy and top-1 agreement with the float model come from the
*deployed* file on the test set (``--limit``: the first N); latency: every deployed model of a
network timed together in interleaved rounds (``lighten.measure.timing``), the median with the
interquartile range as its spread, threads pinned; ratio columns say ≈ where two ranges
overlap. The hardware ceiling is a 1024^3 uint8 x int8 MatMulInteger vs fp32 MatMul in ONNX
Runtime. Writes quant_peers.{json,md} to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from bench_timing import ms_cell, overlap, ratio_cell, spread_note, time_rows

from lighten.backends import get_backend
from lighten.backends.onnxrt import OnnxRuntimeBackend, OrtCompiled, session_options
from lighten.backends.torch_eager import TorchCompiled
from lighten.data import DataSpec, load_data
from lighten.export import INPUT_NAME, OUTPUT_NAME
from lighten.measure import accuracy, agreement
from lighten.measure.latency import median_latency_ms
from lighten.measure.timing import time_interleaved
from lighten.models import ModelSpec, build_model, shipped_checkpoint
from lighten.provenance import atomic_write_text, describe_machine, machine, versions
from lighten.quant import PTQConfig, quantize_ptq_

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)


def ort_file(path: Path, threads: int) -> OrtCompiled:
    """An ONNX file another tool wrote, opened by our ORT backend: the same session settings."""
    return OnnxRuntimeBackend(threads=threads).compile_file(path, input_shape=SHAPE)


def float_onnx(model, calib, work: Path, threads: int) -> dict:
    """Float model: our verified export on ORT, the very same file on OpenVINO."""
    ort = get_backend("onnxruntime", threads=threads).compile(
        model, input_shape=SHAPE, workdir=work / "float", sample_inputs=calib[:64])
    ov = get_backend("openvino", threads=threads).compile_file(ort.onnx_path, input_shape=SHAPE)
    eager = get_backend("torch", threads=threads).compile(model, input_shape=SHAPE,
                                                          workdir=work / "float")
    eager.bytes_on_disk = saved_bytes(model)
    return {"float / onnxruntime": ort, "float / openvino": ov, "float / torch": eager}


def ours(model, calib, work: Path, threads: int, calibration: str) -> dict:
    """lighten quant.ptq (BN folded, per-channel weights) exported once, run on both runtimes."""
    q = quantize_ptq_(copy.deepcopy(model), calib.split(64), PTQConfig(calibration=calibration))
    ort = get_backend("onnxruntime", threads=threads).compile(
        q, input_shape=SHAPE, workdir=work / f"ours-{calibration}", sample_inputs=calib[:64])
    ov = get_backend("openvino", threads=threads).compile_file(ort.onnx_path, input_shape=SHAPE)
    name = f"lighten quant.ptq {calibration}"
    return {f"{name} / onnxruntime": ort, f"{name} / openvino": ov}


class _Reader:
    """onnxruntime.quantization wants a CalibrationDataReader: one feed dict per call."""

    def __init__(self, calib: torch.Tensor):
        self._batches = iter([{INPUT_NAME: b.numpy()} for b in calib.split(64)])

    def get_next(self):
        return next(self._batches, None)


def ort_static(float_path: Path, calib, work: Path, threads: int, fmt: str) -> dict:
    """ORT quantize_static, QDQ, per-channel, MinMax: S8S8, or U8S8 with 7-bit weights."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = work / "ort-pre.onnx", work / f"ort-{fmt}.onnx"
    if not pre.exists():
        quant_pre_process(str(float_path), str(pre))
    act = QuantType.QInt8 if fmt == "S8S8" else QuantType.QUInt8
    quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ,
                    activation_type=act, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=fmt == "U8S8")
    name = f"ORT quantize_static {fmt}{' reduce_range' if fmt == 'U8S8' else ''}"
    ov = get_backend("openvino", threads=threads).compile_file(out, input_shape=SHAPE)
    return {f"{name} / onnxruntime": ort_file(out, threads), f"{name} / openvino": ov}


def nncf_openvino(float_path: Path, calib, work: Path, threads: int) -> dict:
    """NNCF post-training quantization of the OpenVINO model (default preset), saved as IR."""
    import nncf
    import openvino as ov

    dataset = nncf.Dataset(list(calib.split(64)), lambda b: b.numpy())
    batches = -(-len(calib) // 64)  # subset_size counts dataset items (batches of 64)
    quantized = nncf.quantize(ov.Core().read_model(str(float_path)), dataset,
                              subset_size=batches)
    ov.save_model(quantized, str(work / "nncf.xml"), compress_to_fp16=False)
    ov_c = get_backend("openvino", threads=threads).compile_file(work / "nncf.xml",
                                                                input_shape=SHAPE)
    return {"NNCF int8 / openvino": ov_c}


@contextmanager
def _quiet_torch_ao():
    """torch.ao.quantization and the TorchScript exporter are deprecated in torch 2.13 and say
    so on every call; the peer is measured as it ships, so only the warnings are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="(?s).*deprecat", category=UserWarning)
        yield


def saved_bytes(model) -> int:
    """Size of ``torch.save(model.state_dict())``: what a plain PyTorch user ships."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def torch_ao_fx(model, calib, work: Path, threads: int) -> tuple[dict, dict]:
    """Plain torch.ao FX PTQ: prepare_fx / convert_fx with the x86 qconfig mapping, calibrated
    on the same batches, run by PyTorch's x86 int8 engine; its ONNX export (if the exporter
    takes it) on ORT and OpenVINO. Returns (deployed, {method: why it is missing})."""
    torch.backends.quantized.engine = "x86"
    with _quiet_torch_ao():
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                              (calib[:1],))
        with torch.no_grad():
            for batch in calib.split(64):
                prepared(batch)
        quantized = convert_fx(prepared).eval()
    name = "torch.ao FX PTQ x86"
    eager = TorchCompiled(quantized, input_shape=SHAPE, threads=threads,
                          info={"engine": "int8 (x86)", **_ao_layer_counts(quantized)})
    eager.bytes_on_disk = saved_bytes(quantized)
    deployed, missing = {f"{name} / torch": eager}, {}
    path = work / "torch-ao.onnx"
    try:
        with _quiet_torch_ao():
            # output_names is required: without it the TorchScript exporter's dynamic-axes
            # check reads the fx GraphModule's graph as a TorchScript graph and fails
            torch.onnx.export(quantized, (calib[:1],), str(path), dynamo=False,
                              opset_version=17, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:  # the exporter raises many types; the row says why it is absent
        why = f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        missing = {f"{name} / onnxruntime": why, f"{name} / openvino": why}
        return deployed, missing
    ov = get_backend("openvino", threads=threads).compile_file(path, input_shape=SHAPE)
    return deployed | {f"{name} / onnxruntime": ort_file(path, threads),
                       f"{name} / openvino": ov}, missing


def _ao_layer_counts(quantized) -> dict:
    """Conv/Linear layers that became int8 modules vs all conv/linear layers."""
    from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule

    int8 = sum(isinstance(m, WeightedQuantizedModule) for m in quantized.modules())
    floats = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in quantized.modules())
    return {"int8_layers": int8, "compute_layers": int8 + floats}


def _matmul_graph(kind: str, a: np.ndarray, b: np.ndarray):
    """1024^3 matmul as ONNX: fp32 MatMul, MatMulInteger (ORT's integer kernel) or QDQ MatMul
    (QuantizeLinear/DequantizeLinear pairs: what OpenVINO turns into an int8 matmul)."""
    from onnx import TensorProto, helper, numpy_helper

    n = a.shape[0]
    if kind == "fp32":
        nodes, a_type, y_type = [helper.make_node("MatMul", ["a", "b"], ["y"])], \
            TensorProto.FLOAT, TensorProto.FLOAT
    elif kind == "int8":
        nodes, a_type, y_type = [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], \
            TensorProto.UINT8, TensorProto.INT32
    else:  # float input -> Q -> DQ: the pattern OpenVINO's low-precision passes make int8
        nodes = [helper.make_node("QuantizeLinear", ["a", "sa", "za"], ["qa"]),
                 helper.make_node("DequantizeLinear", ["qa", "sa", "za"], ["fa"]),
                 helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
                 helper.make_node("MatMul", ["fa", "fb"], ["y"])]
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    inits = [numpy_helper.from_array(b, "b")]
    if kind == "qdq":
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "sa"),
                  numpy_helper.from_array(np.array(128, np.uint8), "za"),
                  numpy_helper.from_array(np.array(0.01, np.float32), "sb"),
                  numpy_helper.from_array(np.array(0, np.int8), "zb")]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_ceiling(threads: int, runs: int, work: Path) -> dict:
    """The best int8 can do on each runtime: a 1024^3 matmul, int8 vs fp32 (ORT: uint8 x int8
    MatMulInteger; OpenVINO: the same integers through QuantizeLinear/DequantizeLinear)."""
    import onnx
    import onnxruntime as ort

    n, rng = 1024, np.random.default_rng(0)
    a_f = rng.standard_normal((n, n), dtype=np.float32)
    b_f = rng.standard_normal((n, n), dtype=np.float32)
    a_q = rng.integers(0, 256, (n, n)).astype(np.uint8)
    b_q = rng.integers(-127, 128, (n, n)).astype(np.int8)
    cases = {"fp32": (a_f, b_f), "int8": (a_q, b_q), "qdq": (a_f, b_q)}
    calls: dict[tuple[str, str], _Call] = {}  # (runtime, fp32 | int8) -> one matmul
    for kind, (a, b) in cases.items():
        proto = _matmul_graph(kind, a, b)
        if kind != "qdq":
            session = ort.InferenceSession(proto.SerializeToString(), session_options(threads),
                                           providers=["CPUExecutionProvider"])
            calls["onnxruntime", kind] = _Call(lambda s=session, a=a: s.run(None, {"a": a}))
        if kind != "int8":
            import openvino as ov

            path = work / f"ceiling-{kind}.onnx"
            onnx.save(proto, path)
            compiled = ov.Core().compile_model(str(path), "CPU", {
                "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            calls["openvino", "fp32" if kind == "fp32" else "int8"] = _Call(
                lambda r=request, a=a: r.infer({0: a}))
    timing = time_interleaved(list(calls.values()), runs=runs, batches=(1,))
    stats = dict(zip(calls, timing.stats[1], strict=True))
    return {rt: _pair(stats[rt, "fp32"], stats[rt, "int8"]) for rt in ("onnxruntime", "openvino")}


class _Call:
    """A fixed call (its input is built in) with the ``latency_ms`` of a compiled model, so
    :func:`~lighten.measure.timing.time_interleaved` can time it among others."""

    def __init__(self, fn):
        self.fn = fn

    def latency_ms(self, batch: int, *, warmup: int = 10, runs: int = 50) -> float:
        return median_latency_ms(self.fn, warmup=warmup, runs=runs)


def _pair(fp32, int8) -> dict:
    """fp32 vs int8 :class:`~lighten.measure.timing.LatencyStats`: medians, spreads, ratio, and
    whether the two ranges overlap (the ratio is then within the noise)."""
    return {"fp32_ms": fp32.median, "int8_ms": int8.median, "fp32_spread": fp32.spread,
            "int8_spread": int8.spread, "ratio": fp32.median / int8.median,
            "overlap": fp32.low <= int8.high and int8.low <= fp32.high}


def ceiling_text(c: dict) -> str:
    """A ceiling's speed-up: ``2.76x``, or ``≈ (1.04x)`` where fp32 and int8 ranges overlap."""
    return f"≈ ({c['ratio']:.2f}x)" if c.get("overlap") else f"{c['ratio']:.2f}x"


def conv_ceiling(threads: int, runs: int, work: Path) -> dict:
    """ResNet-20-sized layers, int8 vs float on each runtime: six conv 3x3 64->64 + ReLU on 7x7
    maps at batch 64, quantized by lighten quant.ptq (QLinearConv chain on ORT; int8 on
    OpenVINO). Closer to these models than a big matmul; six layers amortize the input
    quantization and output dequantization as a whole network does."""
    shape = (64, 7, 7)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(*[m for _ in range(6) for m in (
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU())]).eval()
    x = torch.randn(256, *shape).relu()
    q = quantize_ptq_(copy.deepcopy(layer), x.split(64), PTQConfig())
    result = {}
    for runtime in ("onnxruntime", "openvino"):
        backend = get_backend(runtime, threads=threads)
        pair = [backend.compile(m, input_shape=shape, workdir=work / f"conv-{runtime}-{i}",
                                sample_inputs=x[:64]) for i, m in enumerate((layer, q))]
        fp32, int8 = time_interleaved(pair, runs=runs, batches=(64,)).stats[64]
        result[runtime] = _pair(fp32, int8)
    return result


def _ms(c: dict, kind: str) -> str:
    """One side of a ceiling: ``12.3 ms ±2%``."""
    row = {"ms": c[f"{kind}_ms"], "ms_spread": c[f"{kind}_spread"]}
    value, _, spread = ms_cell(row, "ms", 1).partition(" ")
    return f"{value} ms {spread}".rstrip()


def evaluate(compiled, x: np.ndarray, labels, reference) -> tuple[float, float, torch.Tensor]:
    logits = torch.from_numpy(np.concatenate([compiled(b) for b in np.array_split(x, 20)]))
    ref = logits if reference is None else reference
    return accuracy(logits, labels), agreement(logits, ref), logits


def bench_model(name: str, data, args, work: Path) -> list[dict]:
    spec = ModelSpec(zoo=name, weights=str(shipped_checkpoint(name, "fashion-mnist")))
    model = build_model(spec, input_shape=SHAPE, num_classes=10).eval()
    calib = torch.stack([data.train[i][0] for i in range(args.calib)])  # same for every method
    n_test = min(args.limit or len(data.test), len(data.test))
    test_x = torch.stack([data.test[i][0] for i in range(n_test)]).numpy()
    labels = torch.tensor([int(data.test[i][1]) for i in range(n_test)])

    deployed = float_onnx(model, calib, work, args.threads)
    float_path = deployed["float / onnxruntime"].onnx_path
    for calibration in args.calibrations:
        deployed |= ours(model, calib, work, args.threads, calibration)
    for fmt in ("S8S8", "U8S8"):
        deployed |= ort_static(float_path, calib, work, args.threads, fmt)
    deployed |= nncf_openvino(float_path, calib, work, args.threads)
    ao, missing = torch_ao_fx(model, calib, work, args.threads)
    deployed |= ao

    rows, reference = [], None
    for method, compiled in deployed.items():
        acc, agree, logits = evaluate(compiled, test_x, labels, reference)
        reference = logits if reference is None else reference  # float on ORT comes first
        rows.append({"model": name, "method": method, "runtime": compiled.backend,
                     "accuracy": acc, "agreement": agree, "bytes": compiled.bytes_on_disk,
                     "int8_layers": int8_layers(compiled.info)})
        print(f"  {name}: {method}: accuracy {acc:.4f}, agreement {agree:.4f}", flush=True)
    args.timing = time_rows(rows, list(deployed.values()), runs=args.runs)
    for method, why in missing.items():
        runtime = method.rsplit(" / ", 1)[1]
        rows.append({"model": name, "method": method, "runtime": runtime, "missing": why})
        print(f"  {name}: {method}: not measured ({why})", flush=True)
    return rows


def int8_layers(info: dict) -> str:
    """OpenVINO: compute layers that run int8 / all (runtime graph); ORT: its integer op types."""
    if "int8_layers" in info:
        return f"{info['int8_layers']}/{info['compute_layers']}"
    return ", ".join(info.get("integer_ops", [])) or "-"


def table(rows: list[dict], ceiling: dict[str, dict]) -> str:
    lines = ["| model | method / runtime | acc % | Δ pts | agree % | bytes | b1 ms | b64 ms | "
             "b64 speedup vs ORT float | vs same-runtime float | of int8 ceiling | int8 layers |",
             "|---" * 12 + "|"]
    floats = {(r["model"], r["runtime"]): r for r in rows if r["method"].startswith("float")}
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['model']} | {r['method']} | " + " | ".join(["-"] * 10) + " |")
            continue
        base, same = floats[(r["model"], "onnxruntime")], floats[(r["model"], r["runtime"])]
        s_same = same["latency_ms_b64"] / r["latency_ms_b64"]
        own = ceiling.get(r["runtime"])  # no matmul ceiling measured for the torch runtime
        of_ceiling = ("-" if r is same or own is None
                      else "≈" if overlap(same, r, "latency_ms_b64")
                      else f"{100 * s_same / own['ratio']:.0f}%")
        lines.append(
            f"| {r['model']} | {r['method']} | {100 * r['accuracy']:.2f} | "
            f"{100 * (r['accuracy'] - base['accuracy']):+.2f} | {100 * r['agreement']:.2f} | "
            f"{r['bytes']:,} | {ms_cell(r, 'latency_ms_b1', 3)} | {ms_cell(r, 'latency_ms_b64')} "
            f"| {ratio_cell(base, r)} | {ratio_cell(same, r)} | {of_ceiling} | "
            f"{r['int8_layers']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    parser.add_argument("--calibrations", nargs="+", default=["minmax", "percentile"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=512, help="calibration training samples")
    parser.add_argument("--runs", type=int, default=100, help="timed runs at batch 64 (x4 at b1)")
    parser.add_argument("--limit", type=int, default=None,
                        help="test images to evaluate (default: all 10,000)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for quant_peers.{json,md} (a trial run: somewhere in /tmp)")
    args = parser.parse_args(argv)
    args.timing = {}
    torch.set_num_threads(args.threads)

    data = load_data(DataSpec(name="fashion-mnist"))
    load_before = os.getloadavg()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if shipped_checkpoint(name, "fashion-mnist") is None:
                skipped.append(name)
                print(f"skipping {name}: no shipped Fashion-MNIST checkpoint yet")
                continue
            (Path(tmp) / name).mkdir()
            rows += bench_model(name, data, args, Path(tmp) / name)
        ceiling = matmul_ceiling(args.threads, runs=min(30, args.runs), work=Path(tmp))
        conv = conv_ceiling(args.threads, runs=args.runs, work=Path(tmp))
    load_after = os.getloadavg()

    md = table(rows, ceiling)
    ort_c, ov_c = ceiling["onnxruntime"], ceiling["openvino"]
    note = (f"\n\nint8 ceiling (1024^3 matmul, int8 vs fp32 on the same runtime, {args.threads} "
            f"threads, timed together in interleaved rounds): ORT MatMulInteger u8s8 "
            f"{_ms(ort_c, 'int8')} vs MatMul fp32 {_ms(ort_c, 'fp32')} = {ceiling_text(ort_c)}; "
            f"OpenVINO QDQ MatMul {_ms(ov_c, 'int8')} vs fp32 {_ms(ov_c, 'fp32')} = "
            f"{ceiling_text(ov_c)}. Conv ceiling (6 x conv 3x3 64->64 + ReLU, 7x7, b64, lighten "
            f"quant.ptq): ORT {ceiling_text(conv['onnxruntime'])}, OpenVINO "
            f"{ceiling_text(conv['openvino'])}. "
            "'of int8 ceiling' = speed-up over the same runtime's float / that runtime's matmul "
            f"ceiling. Machine: {describe_machine(machine())}. Load average before/after: "
            f"{load_before[0]:.1f} / {load_after[0]:.1f} (shared machine). "
            f"{spread_note(args.timing) if args.timing else ''} Calibration: first "
            f"{args.calib} training images for every method; accuracy on the first "
            f"{min(args.limit or 10000, 10000)} test images.")
    if skipped:
        note += f" Not measured (no checkpoint yet): {', '.join(skipped)}."
    for why in sorted({r["missing"] for r in rows if "missing" in r}):
        note += f" torch.ao FX rows with '-': {why}."
    note += (" torch.ao FX PTQ: prepare_fx/convert_fx with get_default_qconfig_mapping('x86'), "
             "run eagerly by PyTorch's x86 int8 engine (bytes: saved state_dict); its rows on "
             "onnxruntime/openvino run the TorchScript export of that same GraphModule.")
    print(md + note)
    args.out.mkdir(parents=True, exist_ok=True)
    import nncf
    import openvino

    info = {"machine": machine(), "threads": args.threads,
            "versions": {**versions(), "openvino": openvino.__version__,
                         "nncf": nncf.__version__},
            "calib_samples": args.calib, "test_images": args.limit,
            "timing": args.timing, "load_average": [load_before, load_after],
            "ceiling": ceiling, "conv_ceiling": conv, "skipped": skipped, "rows": rows}
    atomic_write_text(args.out / "quant_peers.json", json.dumps(info, indent=2))
    atomic_write_text(args.out / "quant_peers.md", md + note + "\n")


if __name__ == "__main__":
    main()
