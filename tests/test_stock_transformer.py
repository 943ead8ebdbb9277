"""PyTorch's own transformer blocks (nn.TransformerEncoder/-Layer, nn.TransformerDecoderLayer,
nn.MultiheadAttention) are quantized by quant.dynamic / quant.ptq / quant.weight_only: they are
swapped for equivalent unfused modules (lighten.unfused) whose Linears every quantizer handles,
and prune.heads / prune.neurons keep working on them."""

from __future__ import annotations

import collections
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import lighten
from lighten.artifact import load_artifact, save_artifact
from lighten.data import bundle_from_datasets
from lighten.export import export_onnx
from lighten.quant.dynamic import DynamicQuantLinear
from lighten.quant.modules import QuantLinear
from lighten.quant.quantizer import sqnr_db
from lighten.quant.weight_only import WeightOnlyLinear
from lighten.unfused import (
    UnfusedMultiheadAttention,
    UnfusedTransformerDecoderLayer,
    UnfusedTransformerEncoder,
    unfuse_,
)

SHAPE = (6, 8)  # tokens, features

MODEL_SRC = '''
import torch
from torch import nn


class EncoderNet(nn.Module):
    """Linear embedding -> nn.TransformerEncoder (2 stock layers, final norm) -> mean -> head."""

    def __init__(self, batch_first=True, norm_first=False, activation="gelu", num_classes=5):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):  # (B, T, 8)
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


class DecoderNet(nn.Module):
    """A bare nn.MultiheadAttention makes the memory; a stock decoder layer with a causal mask."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(32, num_classes)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(6))

    def forward(self, x):  # (B, 6, 8)
        h = self.embed(x)
        memory, _ = self.attn(h, h, h)
        h = self.decoder(h, memory, tgt_mask=self.causal, tgt_is_causal=True)
        return self.head(h.mean(1))


def encoder_net(num_classes=5, **kwargs):
    torch.manual_seed(0)
    return EncoderNet(num_classes=num_classes, **kwargs)


def decoder_net(num_classes=5, **kwargs):
    torch.manual_seed(0)
    return DecoderNet(num_classes=num_classes, **kwargs)
'''

ENCODER_LINEARS = 2 * 6 + 2  # per layer q, k, v, out, linear1, linear2; embed and head
DECODER_LINEARS = 4 + (4 + 4 + 2) + 2  # bare attention, decoder layer (self, cross, ff), ends


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "stock_transformer_nets.py"
    path.write_text(MODEL_SRC)
    return path


def build(src: Path, factory: str, **kwargs) -> nn.Module:
    spec = importlib.util.spec_from_file_location("stock_transformer_nets_test", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, factory)(**kwargs).eval()


def bundle():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, *SHAPE, generator=g), torch.randint(0, 5, (64,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    return bundle_from_datasets(data, data)


def inputs(n=32, seed=2):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def count(model, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def reloads(model, src, factory, tmp_path, kwargs=None, name="m"):
    """Saved against the python: source, loaded in this process: same outputs."""
    path = tmp_path / f"{name}.safetensors"
    spec = {"python": f"{src}:{factory}", "input_shape": list(SHAPE), "kwargs": kwargs or {}}
    size = save_artifact(model, path, model_spec=spec, input_shape=SHAPE, num_classes=5)
    loaded, _ = load_artifact(path)
    x = inputs(8, seed=5)
    assert torch.equal(outputs(loaded, x), outputs(model, x))
    return loaded, size


def ort_ops(model, tmp_path, name="m") -> tuple[collections.Counter, int]:
    """Op types ONNX Runtime runs after its optimizations, and how many float matrices (weights
    kept in float) the exported file holds."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    check = export_onnx(model, tmp_path / f"{name}.onnx", input_shape=SHAPE,
                        sample_inputs=inputs(16))
    assert check.agreement == 1.0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    ort.InferenceSession(str(check.path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    float_matrices = sum(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2
                         for t in onnx.load(str(check.path)).graph.initializer)
    return collections.Counter(n.op_type for n in graph.node), float_matrices


# ----------------------------------------------------------------------------- the swap


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_unfused_encoder_computes_what_torch_computes(batch_first, norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    stock = nn.Sequential(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16))).eval()
    unfused = copy.deepcopy(stock)
    assert unfuse_(unfused) == ["0"] and isinstance(unfused[0], UnfusedTransformerEncoder)
    assert count(unfused, nn.MultiheadAttention) == 0 and count(unfused, nn.Linear) == 12
    b, s = 3, 7
    x = torch.randn(b, s, 16) if batch_first else torch.randn(s, b, 16)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, 5:], pad[2, 6:] = True, True
    causal = nn.Transformer.generate_square_subsequent_mask(s)
    for kwargs in ({}, {"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True},
                   {"mask": causal, "src_key_padding_mask": pad}):
        for grad in (False, True):  # torch's nested-tensor path runs without gradients only
            with torch.set_grad_enabled(grad):
                ref, got = stock[0](x, **kwargs), unfused[0](x, **kwargs)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)  # measured: 7e-7


@pytest.mark.parametrize("norm_first", [False, True])
def test_unfused_decoder_and_attention_compute_what_torch_computes(norm_first):
    torch.manual_seed(0)
    stock = nn.ModuleDict({
        "dec": nn.TransformerDecoder(nn.TransformerDecoderLayer(
            16, 4, 32, norm_first=norm_first, activation="gelu"), 2),
        "mha": nn.MultiheadAttention(16, 4, kdim=12, vdim=10, batch_first=True)}).eval()
    unfused = copy.deepcopy(stock)
    assert sorted(unfuse_(unfused)) == ["dec", "mha"]
    assert isinstance(unfused["dec"].layers[1], UnfusedTransformerDecoderLayer)
    t, s, b = 5, 7, 3
    tgt, mem = torch.randn(t, b, 16), torch.randn(s, b, 16)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(t)
    with torch.no_grad():
        for kwargs in ({}, {"tgt_mask": causal, "tgt_is_causal": True},
                       {"tgt_mask": causal, "memory_key_padding_mask": pad}):
            torch.testing.assert_close(unfused["dec"](tgt, mem, **kwargs),
                                       stock["dec"](tgt, mem, **kwargs), atol=1e-5, rtol=0)
        q, k, v = torch.randn(b, t, 16), torch.randn(b, s, 12), torch.randn(b, s, 10)
        for kwargs in ({}, {"attn_mask": torch.randn(b * 4, t, s)},
                       {"key_padding_mask": pad, "average_attn_weights": False}):
            for got, ref in zip(unfused["mha"](q, k, v, **kwargs), stock["mha"](q, k, v, **kwargs),
                                strict=True):
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_what_cannot_be_unfused_stays_float_with_the_reason():
    class OwnLayer(nn.TransformerEncoderLayer):  # a subclass: its forward is its own
        pass

    model = nn.Sequential(nn.Linear(8, 16), OwnLayer(16, 2, 32, batch_first=True),
                          nn.MultiheadAttention(16, 2, add_bias_kv=True)).eval()
    notes: list[str] = []
    lighten.quant.quantize_dynamic_(model, notes=notes)
    assert type(model[1]) is OwnLayer and type(model[1].linear1) is nn.Linear
    assert type(model[2]) is nn.MultiheadAttention and isinstance(model[0], DynamicQuantLinear)
    assert any(n.startswith("2 (MultiheadAttention) kept fused: add_bias_kv") for n in notes)
    assert any("1.linear1 left in float" in n and "reads its weight" in n for n in notes)


# ----------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize(("batch_first", "norm_first"), [(True, False), (False, True)])
def test_quant_dynamic_makes_every_encoder_linear_int8(src, tmp_path, batch_first, norm_first):
    kwargs = {"batch_first": batch_first, "norm_first": norm_first}
    model = build(src, "encoder_net", **kwargs)
    q, report = lighten.compress(model, {"quant.dynamic": {}}, data=bundle())
    assert count(q, DynamicQuantLinear) == ENCODER_LINEARS and count(q, nn.Linear) == 0
    assert not any("left in float" in n for n in report.notes)
    assert state_bytes(model.encoder) / state_bytes(q.encoder) > 3.0  # measured 3.2x
    x = inputs()
    # measured 35.6-35.9 dB, max |diff| 1.1-1.6e-2 on outputs up to 0.9
    assert sqnr_db(outputs(model, x), outputs(q, x)) > 30
    loaded, _ = reloads(q, src, "encoder_net", tmp_path, kwargs)
    assert count(loaded, DynamicQuantLinear) == ENCODER_LINEARS
    ops, float_matrices = ort_ops(q, tmp_path)
    integer = ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] + ops["MatMulInteger"]
    assert integer == ENCODER_LINEARS and ops["Gemm"] == 0 and float_matrices == 0
    assert ops["MatMul"] + ops["FusedMatMul"] == 4  # only q@k and attn@v stay float


def test_quant_ptq_makes_every_encoder_linear_static_int8(src, tmp_path):
    model = build(src, "encoder_net")
    q, _ = lighten.compress(model, {"quant.ptq": {"calib_samples": 64}}, data=bundle())
    assert count(q, QuantLinear) == ENCODER_LINEARS and count(q, nn.Linear) == 0
    assert state_bytes(model.encoder) / state_bytes(q.encoder) > 2.8  # measured 2.95x
    x = inputs()
    assert sqnr_db(outputs(model, x), outputs(q, x)) > 25  # measured 34.0 dB, max |diff| 1.7e-2
    reloads(q, src, "encoder_net", tmp_path)
    ops, float_matrices = ort_ops(q, tmp_path)
    integer = ops["QGemm"] + ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] + ops[
        "MatMulInteger"]
    assert integer == ENCODER_LINEARS and ops["Gemm"] == 0
    assert ops["MatMul"] + ops["FusedMatMul"] == 4 and float_matrices == 0


def test_quant_weight_only_makes_every_encoder_linear_4_bit(src, tmp_path):
    model = build(src, "encoder_net")
    float_bytes = save_artifact(model, tmp_path / "f.safetensors", input_shape=SHAPE,
                                num_classes=5, model_spec={"python": f"{src}:encoder_net",
                                                           "input_shape": list(SHAPE)})
    q, _ = lighten.compress(model, {"quant.weight_only": {"bits": 4, "method": "gptq",
                                                          "calib_samples": 64}}, data=bundle())
    assert count(q, WeightOnlyLinear) == ENCODER_LINEARS and count(q, nn.Linear) == 0
    assert {m.bits for m in q.modules() if isinstance(m, WeightOnlyLinear)} == {4}
    x = inputs()
    assert sqnr_db(outputs(model, x), outputs(q, x)) > 12  # measured 21.0 dB, max |diff| 6.8e-2
    _, size = reloads(q, src, "encoder_net", tmp_path)
    assert float_bytes / size > 3.0  # packed 4-bit weights; fp16 scales, float norms/biases
    ops, float_matrices = ort_ops(q, tmp_path)
    assert ops["DequantizeLinear"] == ENCODER_LINEARS and float_matrices == 0


def test_decoder_layer_and_bare_attention_are_quantized(src, tmp_path):
    model = build(src, "decoder_net")
    q, _ = lighten.compress(model, {"quant.dynamic": {}}, data=bundle())
    assert count(q, DynamicQuantLinear) == DECODER_LINEARS and count(q, nn.Linear) == 0
    assert isinstance(q.attn, UnfusedMultiheadAttention)
    assert isinstance(q.decoder, UnfusedTransformerDecoderLayer)
    x = inputs()
    assert sqnr_db(outputs(model, x), outputs(q, x)) > 30  # measured 37.4 dB
    reloads(q, src, "decoder_net", tmp_path)
    ops, _ = ort_ops(q, tmp_path)
    integer = ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] + ops["MatMulInteger"]
    assert integer == DECODER_LINEARS and ops["Gemm"] == 0


# ----------------------------------------------------------------------------- with pruning


def test_prune_heads_then_quant_dynamic(src, tmp_path):
    model = build(src, "encoder_net")
    data = bundle()
    pruned, _ = lighten.compress(model, {"prune.heads": {"ratio": 0.5}}, data=data)
    q, _ = lighten.compress(pruned, {"quant.dynamic": {}}, data=data)
    assert count(q, DynamicQuantLinear) == ENCODER_LINEARS and count(q, nn.Linear) == 0
    attn = q.encoder.layers[0].self_attn
    assert isinstance(attn, UnfusedMultiheadAttention) and attn.num_heads == 2
    assert attn.q_proj.out_features == 16 and attn.out_proj.in_features == 16
    x = inputs()
    assert sqnr_db(outputs(pruned, x), outputs(q, x)) > 30  # measured 38.1 dB
    loaded, _ = reloads(q, src, "encoder_net", tmp_path)
    assert loaded.encoder.layers[1].self_attn.kept == attn.kept


def test_prune_neurons_then_quant_dynamic(src, tmp_path):
    model = build(src, "encoder_net", norm_first=True)
    data = bundle()
    pruned, report = lighten.compress(model, {"prune.neurons": {"ratio": 0.5}}, data=data)
    assert [pruned.encoder.layers[i].linear1.out_features for i in (0, 1)] == [32, 32]
    assert pruned.embed.out_features == 32  # the embedding width is prune.channels'
    assert any("unfused" in n for n in report.notes)
    q, _ = lighten.compress(pruned, {"quant.dynamic": {}}, data=data)
    assert count(q, DynamicQuantLinear) == ENCODER_LINEARS
    reloads(q, src, "encoder_net", tmp_path, {"norm_first": True})
    # heads are still found on the unfused attention, and the width survives a reload
    both, _ = lighten.compress(pruned, {"prune.heads": {"ratio": 0.5}}, data=data)
    assert both.encoder.layers[0].self_attn.num_heads == 2
    reloads(both, src, "encoder_net", tmp_path, {"norm_first": True}, name="both")
