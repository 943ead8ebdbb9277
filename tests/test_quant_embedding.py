"""quant.dynamic on embedding tables: int8 rows with one scale per row, exact reload, ONNX."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.quant.dynamic import (
    DynamicConfig,
    DynamicQuantLinear,
    dynamic_quantize_u8,
    quantize_dynamic_,
)
from lighten.quant.embedding import Int8Embedding

SPEC = {"python": "tests/nowhere.py:net", "input_shape": [6]}


class BagOfWords(nn.Module):
    """Token ids -> mean of their embeddings -> class logits (the table is most of the bytes)."""

    def __init__(self, vocab: int = 2000, dim: int = 64, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def bag() -> BagOfWords:
    torch.manual_seed(0)
    model = BagOfWords().eval()
    with torch.no_grad():  # rows of very different norms, as frequent and rare tokens have
        model.embed.weight.mul_(torch.logspace(-2, 1, 2000)[:, None])
    return model


def ids(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 2000, (n, 6), generator=torch.Generator().manual_seed(seed))


def test_rows_are_int8_within_half_of_their_own_step():
    table = bag().embed
    q = Int8Embedding.from_float(table)
    assert q.weight_int.dtype == torch.int8 and q.weight_scale.shape == (2000,)
    assert bool((q.weight_int[1:].abs().amax(1) == 127).all())  # each row uses its full range
    weight = table.weight.detach()
    err = (q.dequantized_weight() - weight).abs()
    assert bool((err <= q.weight_scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(q.dequantized_weight()[0], torch.zeros(64))  # the padding row stays zero
    x = ids()
    assert torch.allclose(q(x), q.dequantized_weight()[x])
    # one scale per row: the short rows keep their detail, which one per-tensor step would erase
    per_tensor_step = float(weight.abs().max()) / 127
    assert float(weight[1:200].abs().max()) < per_tensor_step / 2
    assert float(err[:200].max()) < per_tensor_step / 100


def test_quant_dynamic_quantizes_tables_shrinks_bytes_and_reloads(tmp_path):
    model = bag()
    f_bytes = save_artifact(model, tmp_path / "f.safetensors", model_spec=SPEC,
                            input_shape=(6,), num_classes=4)
    notes: list[str] = []
    q = quantize_dynamic_(copy.deepcopy(model), DynamicConfig(), notes=notes)
    assert isinstance(q.embed, Int8Embedding) and isinstance(q.head, DynamicQuantLinear)
    x = ids()
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=0.05 * float(model(x).abs().max()))
    path = tmp_path / "q.safetensors"
    q_bytes = save_artifact(q, path, model_spec=SPEC, input_shape=(6,), num_classes=4)
    assert 0.25 < q_bytes / f_bytes < 0.28  # int8 codes plus one float scale per row
    loaded, _ = load_artifact(path, model=BagOfWords())
    assert isinstance(loaded.embed, Int8Embedding) and torch.equal(loaded(x), q(x))
    kept = quantize_dynamic_(copy.deepcopy(model), DynamicConfig(embeddings=False))
    assert type(kept.embed) is nn.Embedding and isinstance(kept.head, DynamicQuantLinear)


def test_max_norm_table_stays_float_with_a_note():
    model = bag()
    model.embed = nn.Embedding(2000, 64, max_norm=1.0)
    notes: list[str] = []
    q = quantize_dynamic_(model, DynamicConfig(), notes=notes)
    assert type(q.embed) is nn.Embedding
    assert any("embed (nn.Embedding with max_norm) stays float" in n for n in notes)
    with pytest.raises(ValueError, match="max_norm"):
        Int8Embedding.from_float(nn.Embedding(4, 2, max_norm=1.0))


def test_onnx_gathers_int8_rows_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from lighten.export import export_onnx
    from lighten.task import InputSpec

    q = quantize_dynamic_(bag(), DynamicConfig())
    x = ids()
    spec = InputSpec("ids", (6,), torch.int64, high=2000)
    path = export_onnx(q, tmp_path / "q.onnx", inputs=[spec], sample_inputs=x).path
    graph = onnx.load(str(path)).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in int8]
    assert gathers, "the table is gathered as int8 codes"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
        head_input = q.embed(x).mean(1)
    # the same integer math: within one output step of the head's int8 matmul
    step = float(dynamic_quantize_u8(head_input)[1]) * float(q.head.weight_scale.max())
    assert np.abs(out - ref).max() <= max(step, 1e-5)


def test_transformers_models_with_tied_and_untied_tables():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64)).eval()
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for model, out in ((bert, lambda r: r.last_hidden_state), (llama, lambda r: r.logits)):
        with torch.no_grad():
            ref = out(model(input_ids=x))
            q = quantize_dynamic_(copy.deepcopy(model), DynamicConfig())
            y = out(q(input_ids=x))
        tables = [m for m in q.modules() if isinstance(m, Int8Embedding)]
        assert tables and not any(type(m) is nn.Embedding for m in q.modules())
        cos = nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
        assert float(cos) > 0.999
