"""``table_bits``: the KV-cache decoder stores its embedding table (and the tied LM head, the same
table) once as 8- or 4-bit rows, which the lookup gathers and MatMulNBits multiplies with; and
MatMulNBits' int8 activations (accuracy level 4, forced for 8-bit weights) are rounded in
PyTorch exactly as ONNX Runtime rounds them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _llm_common import tiny_llama, write_text

from lighten.data import DataSpec, load_data
from lighten.errors import UnsupportedError
from lighten.models import ModelSpec, build_model

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tables")
    folder = tiny_llama(tmp / "model", hidden=48)  # 48 = 3 blocks of 16
    write_text(tmp / "t.txt")
    data = load_data(DataSpec(name="text", path=str(tmp / "t.txt"),
                              tokenizer={"hf": str(folder)}, seq_len=16))
    model = build_model(ModelSpec(hf=str(folder)), input_shape=data.input_shape,
                        num_classes=data.num_classes, task=data.task).eval()
    return tmp, model, data


def test_lookup_rows_are_the_heads_weight_within_half_a_step():
    from lighten.llm.onnx_decoder import NBitsTable
    from lighten.llm.onnx_nbits import dequantize_nbits, int8_blocks

    torch.manual_seed(0)
    weight = torch.randn(50, 48) * torch.logspace(-2, 0, 50)[:, None]
    for bits in (8, 4):
        table = NBitsTable(weight, bits=bits)
        m = table.head.meta
        assert m["block_size"] == 16 and m["bits"] == bits  # 48 = 3 blocks of 16
        head_w = dequantize_nbits(table.head.b, table.head.scales, table.head.zero_points, **m)
        ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
        assert torch.equal(table.lookup(ids), head_w[ids])
        step = weight.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert bool(((head_w - weight).abs() <= step / 2 + 1e-3 * step).all())
        h = torch.randn(5, 48)
        rounded = int8_blocks(h, 16) if bits == 8 else h  # the 8-bit head: int8 activations
        assert torch.allclose(table(h), rounded @ head_w.T, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_decoder_holds_one_quantized_table_and_matches_its_rows(setup, bits):
    import onnx

    from lighten.llm.onnx_decoder import export_decoder

    tmp, model, data = setup
    ids = torch.stack([data.test[i][0] for i in range(2)])[:, :10]
    plain = export_decoder(model, tmp / "float.onnx", sample_ids=ids)
    done = export_decoder(model, tmp / f"t{bits}.onnx", sample_ids=ids, table_bits=bits)
    # against the model run on the same rows: exact but where a float reordering flips an int8
    # rounding tie of the 8-bit head's activations (CPU-dependent: 1.1e-3 on an Intel AMX
    # machine, < 1e-4 on AMD AVX-512); a wrong table or scale is off by whole logits
    assert done.max_diff < (5e-3 if bits == 8 else 1e-4)
    assert done.agreement >= (0.9 if bits == 8 else 0.5)  # against the float table
    vocab, hidden = model.hf.model.embed_tokens.weight.shape
    graph = onnx.load(str(done.path)).graph
    tables = [t for t in graph.initializer if t.dims and t.dims[0] == vocab]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.UINT8  # no float copy
    assert int(np.prod(tables[0].dims)) == vocab * hidden * bits // 8
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 1 and "Gemm" not in ops  # the tied head
    blocks = hidden // 16
    table_bytes = vocab * hidden * bits // 8 + vocab * blocks * (4 + bits / 8)  # + scales, zeros
    # float32 table gone, packed table in; a few kB of lookup nodes
    assert 0 < (plain.bytes - done.bytes) - (4 * vocab * hidden - table_bytes) + 4096 < 8192


def test_table_bits_errors(setup):
    from lighten.llm.onnx_decoder import OnnxDecoder

    _, model, _ = setup
    with pytest.raises(UnsupportedError, match="table_bits must be 4 or 8"):
        OnnxDecoder(model, table_bits=3)
    from lighten.llm.onnx_decoder import NBitsTable

    with pytest.raises(UnsupportedError, match="multiple of 16"):
        NBitsTable(torch.randn(10, 40), bits=8)


def rtn_copy(setup, bits: int):
    """(a copy of the model with ``bits``-bit RTN weights in groups of 16, sample ids)."""
    from lighten.llm.steps import LLMWeightOnlyConfig, quantize_llm_

    _, model, data = setup
    q = copy.deepcopy(model)
    quantize_llm_(q, LLMWeightOnlyConfig(method="rtn", bits=bits, group_size=16),
                  [torch.stack([data.train[i][0] for i in range(4)])])
    return q, torch.stack([data.test[i][0] for i in range(2)])[:, :10]


def test_accuracy_level_4_is_matched_exactly_by_the_pytorch_rounding(setup):
    from lighten.llm.onnx_decoder import export_decoder

    tmp = setup[0]
    q, ids = rtn_copy(setup, 4)
    with torch.no_grad():
        scale = float(q(ids).abs().max())
    done = export_decoder(q, tmp / "l4.onnx", sample_ids=ids, accuracy_level=4)
    # float rounding only: PyTorch rounds the activations as the kernel does
    assert done.max_diff < 5e-4 * max(1.0, scale) and done.agreement > 0.5


def test_eight_bit_layers_run_with_int8_activations_and_say_so(setup):
    from lighten.llm.onnx_decoder import export_decoder

    tmp = setup[0]
    q, ids = rtn_copy(setup, 8)
    done = export_decoder(q, tmp / "w8.onnx", sample_ids=ids)  # level 0 asked
    assert done.nbits_layers == done.int8_activation_layers == 14
    assert "14 with int8 activations" in done.summary()
    assert done.max_diff < 1e-3 and done.agreement >= 0.9
