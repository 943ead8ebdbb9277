"""Does int8 pay beyond ResNets? `quant.ptq {bits: 8}` on five small architectures a new user
would write, float vs int8 on ONNX Runtime and OpenVINO, timed together in interleaved rounds.

    python benchmarks/int8_architectures.py [--archs densenet shufflenet mobilenetv2 mixer seresnet]
        [--threads 2] [--runs 60] [--ptq '{"fallback": "auto"}'] [--tag after] [--out DIR]

The five models are defined here (not in the zoo): DenseNet-style dense blocks (conv-BN-ReLU,
``torch.cat``), ShuffleNetV2-style units (``chunk``, channel shuffle by view/transpose/view),
MobileNetV2-style inverted residuals (ReLU6, depthwise, linear bottleneck + residual add),
MLP-Mixer-style blocks (LayerNorm, token MLP on transposed tokens, GELU) and SE-ResNet-style
basic blocks (squeeze-excitation gate: pool, Linear, ReLU, Linear, sigmoid, multiply). Input:
Fashion-MNIST 1x28x28. Each is trained for ``--epochs`` on ``--train`` images (cached in
``--cache``), so agreement between int8 and float means something; latency does not depend on
it.

Everything goes through the library's own paths: ``lighten.compress(model, {"quant.ptq": ...},
data=...)`` and ``lighten.backends.get_backend(name).compile(...)``, so what is timed is what a
user gets. Per architecture the four deployments (float and int8, on ORT and on OpenVINO) are
timed together by :func:`lighten.measure.timing.time_interleaved` (interleaved rounds, median of
per-round medians, IQR spread) at batch 1 and batch 64. Writes
``int8_architectures-TAG.{json,md}`` to ``--out`` (default benchmarks/results/;
int8_architectures.md there is the before/after summary).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)


# ----------------------------------------------------------------------------- architectures


def cbr(cin, cout, k=3, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(cbr(cin, 2 * growth, 1), cbr(2 * growth, growth, 3))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNetS(nn.Module):
    """DenseNet-BC-style: bottleneck dense layers (1x1 then 3x3, conv-BN-ReLU) joined by concat."""

    def __init__(self, num_classes=10, growth=16, layers=(4, 4)):
        super().__init__()
        c = 2 * growth
        self.stem = cbr(1, c, 3)
        blocks = []
        for i, n in enumerate(layers):
            for _ in range(n):
                blocks.append(DenseLayer(c, growth))
                c += growth
            if i < len(layers) - 1:
                blocks += [cbr(c, c // 2, 1), nn.AvgPool2d(2)]
                c //= 2
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.features(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def channel_shuffle(x, groups=2):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(cbr(cin, cin, 3, stride, groups=cin, relu=False),
                                         cbr(cin, half, 1))
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(cbr(bin_, half, 1), cbr(half, half, 3, stride, groups=half,
                                                             relu=False), cbr(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out)


class ShuffleNetS(nn.Module):
    """ShuffleNetV2-style: chunk, two branches, concat, channel shuffle (view/transpose/view)."""

    def __init__(self, num_classes=10, widths=(48, 96), repeats=(3, 3)):
        super().__init__()
        self.stem = cbr(1, 24, 3)
        units, c = [], 24
        for w, r in zip(widths, repeats, strict=True):
            units.append(ShuffleUnit(c, w, 2))
            units += [ShuffleUnit(w, w, 1) for _ in range(r)]
            c = w
        self.stages = nn.Sequential(*units)
        self.conv_last = cbr(c, 256, 1)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = self.conv_last(self.stages(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2S(nn.Module):
    """MobileNetV2-style inverted residuals (expand 1x1, depthwise 3x3, linear 1x1 + add)."""

    def __init__(self, num_classes=10):
        super().__init__()
        cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1)]  # t, c, n, s
        layers = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)]
        c = 16
        for t, cout, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers += [nn.Conv2d(c, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, token_hidden, channel_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(),
                                       nn.Linear(token_hidden, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(),
                                         nn.Linear(channel_hidden, dim))

    def forward(self, x):  # (B, tokens, dim)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MixerS(nn.Module):
    """MLP-Mixer-style: 4x4 patches, token-mixing and channel-mixing MLPs, LayerNorm, GELU."""

    def __init__(self, num_classes=10, dim=128, depth=4, patch=4):
        super().__init__()
        tokens = (28 // patch) ** 2
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 64, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


class SEBlock(nn.Module):
    def __init__(self, cin, cout, stride, reduction=8):
        super().__init__()
        self.conv1 = cbr(cin, cout, 3, stride)
        self.conv2 = cbr(cout, cout, 3, relu=False)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(cout, cout // reduction), nn.ReLU(inplace=True),
                                nn.Linear(cout // reduction, cout), nn.Sigmoid())
        self.short = (cbr(cin, cout, 1, stride, relu=False) if stride > 1 or cin != cout
                      else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        y = y * self.se(y)[:, :, None, None]
        return self.relu(y + self.short(x))


class SEResNetS(nn.Module):
    """SE-ResNet-style basic blocks with squeeze-excitation gates."""

    def __init__(self, num_classes=10, widths=(32, 64, 128)):
        super().__init__()
        self.stem = cbr(1, widths[0], 3)
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [SEBlock(c, w, 1 if i == 0 else 2), SEBlock(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


ARCHS = {"densenet": DenseNetS, "shufflenet": ShuffleNetS, "mobilenetv2": MobileNetV2S,
         "mixer": MixerS, "seresnet": SEResNetS}


# ----------------------------------------------------------------------------- benchmark


def trained(name: str, data, *, epochs: float, train_n: int, cache: Path) -> nn.Module:
    """The architecture trained briefly on Fashion-MNIST (weights cached between runs)."""
    torch.manual_seed(0)
    model = ARCHS[name]()
    path = cache / f"{name}-{train_n}-{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    xs, ys = data.train.tensors
    xs, ys = xs[:train_n], ys[:train_n]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = int(epochs * len(xs) / 128)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (128,), generator=g)
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def ort_facts(info: dict) -> dict:
    """What ORT runs: integer ops, float compute/elementwise ops, DQ->Q pairs left."""
    import onnx

    ops = info.get("op_types", {})
    graph = onnx.load(info["optimized_path"], load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    dq_q = sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer
               and producer[n.input[0]].op_type == "DequantizeLinear")
    skip = {"QuantizeLinear", "DequantizeLinear", "Constant"}
    float_ops = {op: n for op, n in ops.items()
                 if op not in skip and op not in info.get("integer_ops", [])}
    return {"integer_ops": info.get("integer_ops", []), "float_ops": float_ops,
            "quantize": ops.get("QuantizeLinear", 0), "dequantize": ops.get("DequantizeLinear", 0),
            "dq_q_pairs": dq_q}


def kernel_ms(paths, *, batch: int, threads: int, rounds: int) -> list[float]:
    """ORT's own per-node kernel times (profiler), summed per model: the median of each node
    over interleaved rounds. Sturdier than wall time on a loaded machine: a node's median
    ignores the runs another process interrupted."""
    import onnxruntime as ort

    from lighten.backends.onnxrt import DISABLED_OPTIMIZERS, session_options

    sessions = []
    prefix = Path(tempfile.mkdtemp(prefix="lighten-prof-")) / "p"
    for path in paths:
        opts = session_options(threads)
        opts.enable_profiling, opts.profile_file_prefix = True, str(prefix)
        sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                             disabled_optimizers=DISABLED_OPTIMIZERS))
    x = np.random.default_rng(0).standard_normal((batch, *SHAPE)).astype(np.float32)
    for _ in range(rounds):
        for sess in sessions:
            sess.run(None, {"input": x})
    out = []
    for sess in sessions:
        trace = Path(sess.end_profiling())
        per: dict[str, list] = {}
        for e in json.loads(trace.read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per.setdefault(e["name"], []).append(e["dur"])
        trace.unlink()
        out.append(sum(float(np.median(d[len(d) // 5:])) for d in per.values()) / 1000)
    return out


def evaluate(compiled, xs: np.ndarray, batch=500) -> np.ndarray:
    return np.concatenate([compiled(xs[i:i + batch]) for i in range(0, len(xs), batch)])


def run_arch(name, data, args, work: Path) -> dict:
    from lighten import compress
    from lighten.backends import get_backend
    from lighten.measure.timing import time_interleaved
    from lighten.measure.timing_worker import time_files_in_fresh_process
    from lighten.target import Target

    model = trained(name, data, epochs=args.epochs, train_n=args.train, cache=args.cache)
    test_x, test_y = data.test.tensors
    test_x, test_y = test_x[:args.test], test_y[:args.test].numpy()
    t0 = time.time()
    target = Target.this_machine(threads=args.threads)
    q, report = compress(copy.deepcopy(model), {"quant.ptq": {"bits": 8, **args.ptq}}, data=data,
                         target=target)
    ptq_s = time.time() - t0
    samples = test_x[:64]
    compiled, facts = {}, {}
    for backend in args.backends:
        be = get_backend(backend, threads=args.threads)
        for kind, m in (("float", model), ("int8", q)):
            c = be.compile(m, input_shape=SHAPE, workdir=work / name / f"{kind}-{backend}",
                           sample_inputs=samples)
            compiled[(kind, backend)] = c
            if backend == "onnxruntime":
                facts[kind] = ort_facts(c.info)
            else:
                facts[f"{kind}-{backend}"] = {k: c.info.get(k) for k in
                                              ("compute_layers", "int8_layers")}
    if args.plain:  # the same models exported as before the graph simplification, same rounds
        from lighten.export import export_onnx

        ort_be = get_backend("onnxruntime", threads=args.threads)
        for kind, m in (("float", model), ("int8", q)):
            path = work / name / f"{kind}-plain" / "model.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(m, path, input_shape=SHAPE, verify=False, simplify=False)
            compiled[(f"{kind}-plain", "onnxruntime")] = ort_be.compile_file(path,
                                                                             input_shape=SHAPE)
    keys = list(compiled)
    # a fresh process opens only the deployed files: this one has trained and quantized
    timing = (time_files_in_fresh_process([compiled[k] for k in keys], runs=args.runs, seed=0)
              or time_interleaved([compiled[k] for k in keys], runs=args.runs, batches=(1, 64),
                                  seed=0))
    kernels = {}
    if args.plain:
        names = ["float-plain", "float", "int8-plain", "int8"]
        paths = [compiled[(n, "onnxruntime")].onnx_path for n in names]
        for b in (1, 64):
            kernels[f"b{b}"] = dict(zip(names, kernel_ms(paths, batch=b, threads=1,
                                                         rounds=max(args.runs, 20)), strict=True))
    lat = {f"{kind}/{backend}": {f"b{b}": {"median": timing.stats[b][i].median,
                                            "spread": timing.stats[b][i].spread}
                                 for b in (1, 64)}
           for i, (kind, backend) in enumerate(keys)}
    quality = {}
    ref = evaluate(compiled[("float", "onnxruntime")], test_x.numpy())
    for backend in args.backends:
        out = evaluate(compiled[("int8", backend)], test_x.numpy())
        quality[backend] = {"agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
                            "acc_int8": float(np.mean(out.argmax(1) == test_y))}
    quality["acc_float"] = float(np.mean(ref.argmax(1) == test_y))
    return {"arch": name, "latency": lat, "kernel_ms": kernels, "quality": quality,
            "facts": facts,
            "ptq_seconds": ptq_s, "notes": report.notes,
            "rounds": timing.rounds, "runs_per_round": timing.runs_per_round,
            "params": sum(p.numel() for p in model.parameters())}


def fmt(stat) -> str:
    m, (lo, hi) = stat["median"], stat["spread"]
    half = 100 * (hi - lo) / 2 / m if m else 0.0
    return f"{m:.3g} ±{half:.0f}%"


def markdown(rows, args, machine_line, tag) -> str:
    lines = [f"# int8 vs float per architecture ({tag})", "",
             f"`python benchmarks/int8_architectures.py --threads {args.threads} --runs "
             f"{args.runs} --epochs {args.epochs:g} --train {args.train}"
             + (f" --ptq '{json.dumps(args.ptq)}'" if args.ptq else "")
             + ("" if args.plain else " --no-plain")
             + (f" --tag {tag}" if tag else "") + "`", "",
             "| arch | runtime | float b1 ms | int8 b1 ms | int8/float b1 | float b64 ms | "
             "int8 b64 ms | int8/float b64 | agree % | acc float / int8 % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lat, qual = row["latency"], row["quality"]
        for backend in args.backends:
            f, i = lat[f"float/{backend}"], lat[f"int8/{backend}"]
            lines.append(
                f"| {row['arch']} | {backend} | {fmt(f['b1'])} | {fmt(i['b1'])} | "
                f"{i['b1']['median'] / f['b1']['median']:.2f}x | {fmt(f['b64'])} | "
                f"{fmt(i['b64'])} | {i['b64']['median'] / f['b64']['median']:.2f}x | "
                f"{100 * qual[backend]['agreement']:.1f} | {100 * qual['acc_float']:.1f} / "
                f"{100 * qual[backend]['acc_int8']:.1f} |")
    lines += ["", "int8/float < 1 means int8 is faster. Latency: median of per-round medians, "
              "±half the IQR across interleaved rounds (float and int8, both runtimes, timed "
              f"together); {rows[0]['rounds']} rounds x {rows[0]['runs_per_round']} runs per "
              f"model and batch; {args.threads} threads. Agreement: top-1 match of the int8 "
              f"deployment with the float ONNX model on {args.test} Fashion-MNIST test images.",
              "", "What ONNX Runtime runs in the int8 graph (after its optimizations; data moves "
              "such as Transpose, Reshape, Split, Gather and Pad are listed with the float ops but "
              "carry int8 where no DequantizeLinear precedes them):", "",
              "| arch | integer ops | float ops left | Q / DQ nodes | DQ->Q pairs |",
              "|---|---|---|---|---|"]
    plain = [row for row in rows if "int8-plain/onnxruntime" in row["latency"]]
    for row in rows:
        f = row["facts"]["int8"]
        float_ops = ", ".join(f"{k} {v}" for k, v in f["float_ops"].items())
        lines.append(f"| {row['arch']} | {', '.join(f['integer_ops'])} | {float_ops} | "
                     f"{f['quantize']} / {f['dequantize']} | {f['dq_q_pairs']} |")
    if plain:
        lines += ["", "Same rounds, ONNX Runtime, the files exported without the graph "
                  "simplification (`export_onnx(simplify=False)`: none of "
                  "lighten.graph.onnx_simplify's rewrites: shape arithmetic left, int8 depthwise "
                  "convs and first-conv inputs unpadded, channel shuffles as reshape/transpose, "
                  "token Linears as MatMul + Add) against the default export:", "",
                  "| arch | float b64 ms plain / simplified | int8 b64 ms plain / simplified | "
                  "int8/float b64 plain → simplified | int8/float b1 plain → simplified | "
                  "kernel sum b64 ms: float plain / simpl., int8 plain / simpl. | kernel "
                  "int8/float b64 plain → simplified | kernel int8/float b1 plain → simplified |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in plain:
            lat = row["latency"]
            fp, ip = lat["float-plain/onnxruntime"], lat["int8-plain/onnxruntime"]
            fs, i_s = lat["float/onnxruntime"], lat["int8/onnxruntime"]

            def ratio(a, b, batch):
                return a[batch]["median"] / b[batch]["median"]
            k64, k1 = row["kernel_ms"]["b64"], row["kernel_ms"]["b1"]
            lines.append(f"| {row['arch']} | {fmt(fp['b64'])} / {fmt(fs['b64'])} | "
                         f"{fmt(ip['b64'])} / {fmt(i_s['b64'])} | "
                         f"{ratio(ip, fp, 'b64'):.2f}x → {ratio(i_s, fs, 'b64'):.2f}x | "
                         f"{ratio(ip, fp, 'b1'):.2f}x → {ratio(i_s, fs, 'b1'):.2f}x | "
                         f"{k64['float-plain']:.3g} / {k64['float']:.3g}, "
                         f"{k64['int8-plain']:.3g} / {k64['int8']:.3g} | "
                         f"{k64['int8-plain'] / k64['float-plain']:.2f}x → "
                         f"{k64['int8'] / k64['float']:.2f}x | "
                         f"{k1['int8-plain'] / k1['float-plain']:.2f}x → "
                         f"{k1['int8'] / k1['float']:.2f}x |")
        lines += ["", "Kernel sum: ORT's profiler at 1 thread, each node's median over the "
                  "rounds, summed (the four files in one process, interleaved): what the graph "
                  "costs without the interruptions a loaded machine adds to wall time (with 2 "
                  "threads one descheduled thread stalls every parallel kernel)."]
    lines += ["", f"Machine: {machine_line}. Load average at the end: "
              f"{os.getloadavg()[0]:.1f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=60, help="timed runs per model and batch")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--train", type=int, default=12000, help="training images")
    p.add_argument("--test", type=int, default=2000, help="test images for agreement")
    p.add_argument("--ptq", type=json.loads, default={}, help="extra quant.ptq keys (JSON)")
    p.add_argument("--no-plain", dest="plain", action="store_false",
                   help="skip timing the exports without graph simplification")
    p.add_argument("--tag", default="latest",
                   help="results go to int8_architectures-TAG.{json,md}")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lighten-int8-arch")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lighten.data import DataSpec, load_data
    from lighten.provenance import atomic_write_text, describe_machine, machine, versions

    data = load_data(DataSpec(name="fashion-mnist"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            row = run_arch(name, data, args, Path(tmp))
            rows.append(row)
            r = {b: row["latency"]["int8/onnxruntime"][f"b{b}"]["median"]
                 / row["latency"]["float/onnxruntime"][f"b{b}"]["median"] for b in (1, 64)}
            print(f"{name}: ORT int8/float b1 {r[1]:.2f}x b64 {r[64]:.2f}x; agreement "
                  f"{100 * row['quality']['onnxruntime']['agreement']:.1f}%; int8 ops "
                  f"{row['facts']['int8']['integer_ops']}; float ops "
                  f"{row['facts']['int8']['float_ops']}", flush=True)
    m = machine()
    stem = f"int8_architectures-{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(
        {"rows": rows, "machine": m, "versions": versions(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        indent=1, default=str))
    atomic_write_text(args.out / f"{stem}.md", markdown(rows, args, describe_machine(m), args.tag))
    print(f"wrote {args.out / stem}.md")


if __name__ == "__main__":
    main()
