"""Per-token int8 activations (``SmoothQuantLinear``, ``activations: token``) in ONNX Runtime.

ORT fuses MatMulInteger → Cast → Mul (and a following bias Add) into MatMulIntegerToFloat; with
per-row activation scales that kernel multiplies the bias by the row's scale too. Random BERT
and Llama inits have zero (or no) biases, which hid it; all-MiniLM-L6-v2's ORT embeddings had
cosine 0.65 to PyTorch's. Here every bias is random and ORT runs with its default (all)
optimizations, at batch sizes and lengths other than the export sample's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from lighten.export import export_onnx
from lighten.llm.smoothquant import SmoothQuantLinear
from lighten.llm.sources import CausalLM, SentenceEncoder
from lighten.llm.steps import LLMSmoothQuantConfig, smoothquant_
from lighten.quant.dynamic import DynamicQuantLinear
from lighten.task import Inputs, InputSpec

tf = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

SEQ = 12


def _session(data: bytes, optimize: bool = True):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _random_biases(model: nn.Module, seed: int) -> nn.Module:
    """Trained transformers have biases far from zero; the random inits start them at 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _export_both(layer: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(layer.eval(), (x,), buf, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
                      opset_version=17, dynamo=False)
    return buf.getvalue()


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_biased_layer_matches_torch_at_any_batch_and_length(activations):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    nn.init.normal_(linear.bias, 0.0, 1.0)
    layer = SmoothQuantLinear.smoothed(linear, torch.rand(48) * 4 + 0.1, alpha=0.5,
                                       activations=activations)
    data = _export_both(layer, torch.randn(1, 5, 48))
    fused, plain = _session(data), _session(data, optimize=False)
    for shape in [(1, 1), (3, 7), (2, 33)]:
        x = torch.randn(*shape, 48) * 3
        x[0, 0] *= 40  # an outlier token: its own scale, not the others'
        with torch.no_grad():
            ref = layer(x).numpy()
        for sess in (fused, plain):
            got = sess.run(None, {"x": x.numpy()})[0]
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def _bert_encoder() -> SentenceEncoder:
    torch.manual_seed(1)
    config = tf.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, initializer_range=0.1,
                           attn_implementation="eager")
    return SentenceEncoder(_random_biases(tf.BertModel(config), 2), normalize=True).eval()


def _ids_and_mask(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (batch, SEQ), generator=gen)
    lengths = torch.randint(3, SEQ + 1, (batch,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids, mask


def test_smoothquant_bert_embeddings_match_in_ort(tmp_path):
    model = _bert_encoder()
    calib = [Inputs(_ids_and_mask(4, s)) for s in range(2)]
    smoothquant_(model, LLMSmoothQuantConfig(calib_samples=8), calib)
    layers = [m for m in model.modules() if isinstance(m, SmoothQuantLinear)]
    assert len(layers) == 12 and all(m.activations == "token" for m in layers)
    specs = [InputSpec("ids", (SEQ,), torch.int64, 90), InputSpec("mask", (SEQ,), torch.int64, 2)]
    # traced at batch 1 (lighten's export), run at 5 below
    check = export_onnx(model, tmp_path / "bert.onnx", inputs=specs, verify=False)
    sess = _session(check.path.read_bytes())
    ids, mask = _ids_and_mask(5, 11)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    got = sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
    cosine = (got * ref).sum(-1)  # both L2-normalized
    assert cosine.min() > 0.9999, cosine
    assert np.abs(got - ref).max() < 1e-3


def test_smoothquant_biased_llama_logits_match_in_ort(tmp_path):
    torch.manual_seed(3)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, attention_bias=True, mlp_bias=True)
    model = CausalLM(_random_biases(tf.LlamaForCausalLM(config), 4)).eval()
    gen = torch.Generator().manual_seed(5)
    calib = [torch.randint(0, 96, (4, SEQ), generator=gen) for _ in range(2)]
    smoothquant_(model, LLMSmoothQuantConfig(calib_samples=8), calib)
    assert sum(isinstance(m, SmoothQuantLinear) for m in model.modules()) == 14
    spec = InputSpec("ids", (SEQ,), torch.int64, 96)
    check = export_onnx(model, tmp_path / "llama.onnx", inputs=[spec], verify=False)
    sess = _session(check.path.read_bytes())
    ids = torch.randint(0, 96, (3, SEQ), generator=gen)
    with torch.no_grad():
        ref = model(ids).numpy()
    got = sess.run(None, {"input": ids.numpy()})[0]  # one input keeps the name "input"
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_per_tensor_keeps_the_fused_bias():
    """The per-tensor path is unaffected: its bias stays an Add that ORT folds into the GEMM."""
    import onnx

    layer = DynamicQuantLinear.from_float(_random_biases(nn.Linear(16, 24), 0))
    graph = onnx.load_from_string(_export_both(layer, torch.randn(1, 3, 16))).graph
    ops = [n.op_type for n in graph.node]
    assert "Add" in ops and "Sum" not in ops
