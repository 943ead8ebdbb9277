"""Dynamic int8 LSTM: int8 weights, run-time uint8 ranges, ORT's DynamicQuantizeLSTM kernel."""

from __future__ import annotations

import copy
import io
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from lighten.artifact import load_artifact, save_artifact
from lighten.errors import UnsupportedError
from lighten.quant.dynamic import DynamicConfig, DynamicQuantLinear, quantize_dynamic_
from lighten.quant.dynamic_rnn import DynamicQuantLSTM
from lighten.quant.quantizer import sqnr_db

SPEC = {"python": "tests/nowhere.py:net", "input_shape": [8, 8]}

SHAPES = {  # name -> nn.LSTM kwargs
    "plain": {},
    "batch_first": {"batch_first": True},
    "two_layer_bidirectional": {"num_layers": 2, "bidirectional": True},
    "no_bias": {"bias": False},
}


class Classifier(nn.Module):
    """(B, T, F) sequence -> LSTM -> last step -> Linear logits."""

    def __init__(self, features=8, hidden=32, classes=4, **lstm):
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, batch_first=True, **lstm)
        out = hidden * (2 if lstm.get("bidirectional") else 1)
        self.head = nn.Linear(out, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def sequences(batch=16, steps=10, features=8, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(batch, steps, features, generator=g), dim=1) * 0.3


def lstm_and_input(kind: str, seed=0):
    torch.manual_seed(seed)
    kwargs = SHAPES[kind]
    lstm = nn.LSTM(8, 24, **kwargs).eval()
    x = sequences(batch=6, steps=9)
    return lstm, (x if kwargs.get("batch_first") else x.transpose(0, 1).contiguous())


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_output_and_states_close_to_float_lstm(kind):
    lstm, x = lstm_and_input(kind)
    q = DynamicQuantLSTM.from_float(lstm, reduce_range=True)
    with torch.no_grad():
        ref, (ref_h, ref_c) = lstm(x)
        out, (h, c) = q(x)
    assert out.shape == ref.shape and h.shape == ref_h.shape and c.shape == ref_c.shape
    assert sqnr_db(ref, out) > 30 and sqnr_db(ref_h, h) > 30 and sqnr_db(ref_c, c) > 30
    # a broken gate order or direction would land near 0 dB, not at quantization noise
    assert float((ref - out).abs().max()) < 0.05


def test_initial_states_and_unbatched_input_follow_nn_lstm():
    lstm, x = lstm_and_input("two_layer_bidirectional")
    q = DynamicQuantLSTM.from_float(lstm, reduce_range=True)
    g = torch.Generator().manual_seed(3)
    h0, c0 = torch.randn(4, 6, 24, generator=g), torch.randn(4, 6, 24, generator=g)
    with torch.no_grad():
        ref, (ref_h, _) = lstm(x, (h0, c0))
        out, (h, _) = q(x, (h0, c0))
        zero_state = q(x)[0]
        single, (single_h, _) = q(x[:, 0], (h0[:, 0], c0[:, 0]))
    assert sqnr_db(ref, out) > 30 and sqnr_db(ref_h, h) > 30
    assert float((out - zero_state).abs().max()) > 0.05  # the states were really used
    assert single.shape == (9, 48) and single_h.shape == (4, 24)
    assert sqnr_db(ref[:, 0], single) > 30


@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_are_int8_in_onnx_layout_within_half_a_step(per_channel):
    lstm, _ = lstm_and_input("plain")
    q = DynamicQuantLSTM.from_float(lstm, per_channel=per_channel, reduce_range=False)
    w_int = q.weight_ih_int_l0
    assert w_int.dtype == torch.int8 and w_int.shape == (1, 8, 96)
    assert int(w_int.abs().max()) == 127
    assert q.weight_ih_scale_l0.shape == ((1, 96) if per_channel else (1,))
    i, f, g, o = lstm.weight_ih_l0.detach().chunk(4)
    onnx_order = torch.cat([i, o, f, g]).T  # (in, 4H), gates iofc
    w, _ = q.dequantized_weights(0)
    step = float(q.weight_ih_scale_l0.max())
    assert float((w[0] - onnx_order).abs().max()) <= step / 2 + 1e-7
    narrow = DynamicQuantLSTM.from_float(lstm, reduce_range=True)
    assert int(narrow.weight_hh_int_l0.abs().max()) == 63


def _ort_run(model, x, *, threads):
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("kind", ["batch_first", "two_layer_bidirectional"])
def test_ort_integer_kernel_matches_pytorch_forward(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    from lighten.backends import get_backend

    model = Classifier(**{k: v for k, v in SHAPES[kind].items() if k != "batch_first"}).eval()
    q = quantize_dynamic_(copy.deepcopy(model), DynamicConfig(reduce_range=True))
    x = sequences()
    compiled = get_backend("onnxruntime", threads=1).compile(
        q, input_shape=(10, 8), workdir=tmp_path, sample_inputs=x)
    ops = compiled.info["op_types"]
    assert ops.get("DynamicQuantizeLSTM") == SHAPES[kind].get("num_layers", 1)
    assert "LSTM" not in ops and "MatMul" not in ops and "Gemm" not in ops
    with torch.no_grad():
        y, ref = q(x).numpy(), model(x).numpy()
    out = compiled(x.numpy())
    assert np.abs(out - y).max() <= 1e-5  # one thread: the same integer math, step by step
    assert sqnr_db(torch.from_numpy(ref), torch.from_numpy(out)) > 25
    # More threads: ORT quantizes the hidden state per slice of the batch, not per batch, so
    # the outputs move by less than the quantization error itself (measured: about half).
    two = _ort_run(q, x, threads=2)
    assert np.abs(two - y).max() <= np.abs(ref - y).max()


def test_artifact_weight_bytes_drop_four_times_and_reload_exactly(tmp_path):
    model = Classifier(features=16, hidden=64, num_layers=2).eval()
    f_bytes = save_artifact(model, tmp_path / "f.safetensors", model_spec=SPEC,
                            input_shape=(10, 16), num_classes=4)
    q = quantize_dynamic_(copy.deepcopy(model), DynamicConfig())
    path = tmp_path / "q.safetensors"
    q_bytes = save_artifact(q, path, model_spec=SPEC, input_shape=(10, 16), num_classes=4)
    weights = [t for n, t in q.rnn.named_buffers() if "_int_" in n]
    float_weights = [p for n, p in model.rnn.named_parameters() if n.startswith("weight")]
    assert sum(t.numel() for t in weights) == sum(p.numel() for p in float_weights)
    assert all(t.dtype == torch.int8 for t in weights)
    assert q_bytes / f_bytes < 0.32  # int8 weights; float biases and per-row scales remain
    loaded, _ = load_artifact(path, model=Classifier(features=16, hidden=64, num_layers=2))
    x = sequences(features=16)
    assert isinstance(loaded.rnn, DynamicQuantLSTM) and isinstance(loaded.head, DynamicQuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_backward_is_straight_through_so_biases_can_finetune():
    lstm, x = lstm_and_input("plain")
    q = DynamicQuantLSTM.from_float(lstm, reduce_range=True)
    x = x.clone().requires_grad_()
    q(x)[0].pow(2).sum().backward()
    assert q.bias_l0.grad is not None and x.grad is not None
    # the float LSTM's gradient, up to quantization noise
    x_ref = x.detach().clone().requires_grad_()
    lstm(x_ref)[0].pow(2).sum().backward()
    assert sqnr_db(x_ref.grad, x.grad) > 20


def test_projection_is_refused_and_stays_float_with_a_note():
    with pytest.raises(UnsupportedError, match="proj_size=4 .*ignore"):
        DynamicQuantLSTM.from_float(nn.LSTM(8, 16, proj_size=4))

    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(8, 16, proj_size=4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][-1])

    notes: list[str] = []
    model = quantize_dynamic_(Projected(), DynamicConfig(), notes=notes)
    assert type(model.rnn) is nn.LSTM and isinstance(model.head, DynamicQuantLinear)
    assert any("rnn (LSTM) stays float" in n for n in notes)
    skipped = quantize_dynamic_(Classifier(), DynamicConfig(ignore=["rnn"]))
    assert type(skipped.rnn) is nn.LSTM


MODEL_FILE = '''
from torch import nn


class SeqNet(nn.Module):
    """An 8x8 image read as 8 steps of 8 pixels."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 64, batch_first=True)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.rnn(x.flatten(1, 2))[0][:, -1])


def seqnet():
    return SeqNet()
'''


def test_lstm_model_runs_through_quant_dynamic_recipe(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from lighten.recipe import load_recipe
    from lighten.runner import run_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "models.py").write_text(MODEL_FILE)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: lstm-dynamic
        model: {{python: models.py:seqnet, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 128, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {tmp_path / "out"}
        steps:
          - quant.dynamic: {{}}
    """))
    result = run_recipe(load_recipe(recipe), progress=False)
    base, final = result.rows
    assert final["bytes"] < 0.35 * base["bytes"] and final["agreement"] >= 0.9
    model, _ = load_artifact(tmp_path / "out" / "stages" / "01-quant.dynamic.safetensors")
    assert isinstance(model.rnn, DynamicQuantLSTM)
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "deploy" / "quant.dynamic" / "model.onnx")).graph
    assert "DynamicQuantizeLSTM" in {n.op_type for n in graph.node}


def test_report_table_lists_the_int8_lstm_with_a_high_sqnr():
    from lighten.quant.layer_report import layer_table

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Tagger().eval()
    quantized = copy.deepcopy(model)
    quantized.lstm = DynamicQuantLSTM.from_float(model.lstm)
    (row,) = layer_table(model, quantized, [torch.randn(4, 5, 8)]).rows
    assert (row.name, row.weight_bits, row.activation_bits) == ("lstm", 8, "dynamic")
    assert row.sqnr_db > 30
