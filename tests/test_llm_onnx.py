"""The KV-cache ONNX decoder (lighten.llm.onnx_decoder) on a tiny random Llama: MatMulNBits
holds our packed codes exactly (checked against ONNX Runtime's own kernel), the 4/3-bit GPTQ /
AWQ / RTN decoders reproduce the dequantized PyTorch model's logits through a cached step and
its greedy generation token for token, SmoothQuant's per-token int8 layers export too, and
``lighten export --kv-cache`` writes it from a run's stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _llm_common import tiny_llama, write_text

from lighten.data import DataSpec, load_data
from lighten.models import ModelSpec, build_model

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

SEQ = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llmonnx")
    folder = tiny_llama(tmp / "model")
    write_text(tmp / "t.txt")
    data = load_data(DataSpec(name="text", path=str(tmp / "t.txt"),
                              tokenizer={"hf": str(folder)}, seq_len=SEQ))
    return tmp, folder, data


def fresh(setup):
    _, folder, data = setup
    return build_model(ModelSpec(hf=str(folder)), input_shape=data.input_shape,
                       num_classes=data.num_classes, task=data.task)


def calib(data, n=8):
    return [torch.stack([data.train[i][0] for i in range(n)])]


@pytest.mark.parametrize(("bits", "in_features", "group"), [(4, 40, 16), (3, 64, 32),
                                                            (8, 48, 16)])
def test_matmulnbits_reads_our_packed_codes_exactly(bits, in_features, group):
    """One MatMulNBits node on ORT == our WeightOnlyLinear (odd block counts, a padded last
    group, 3-bit in the 4-bit layout, 8-bit)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lighten.llm.onnx_nbits import dequantize_nbits, pack_nbits
    from lighten.llm.rtn import rtn
    from lighten.quant.weight_only import WeightOnlyLinear

    torch.manual_seed(bits)
    w = torch.randn(24, in_features)
    layer = WeightOnlyLinear(in_features, 24, bias=False, bits=bits, group_size=group,
                             symmetric=False)
    layer.set_quantized(*rtn(w, bits=bits, group_size=group, symmetric=False))
    p = pack_nbits(layer)
    ref = layer.dequantized_weight()
    assert torch.equal(dequantize_nbits(**p), ref)
    inits = [numpy_helper.from_array(p[k].numpy(), k) for k in ("b", "scales", "zero_points")]
    node = helper.make_node("MatMulNBits", ["x", "b", "scales", "zero_points"], ["y"],
                            domain="com.microsoft", K=p["K"], N=p["N"], bits=p["bits"],
                            block_size=p["block_size"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None, in_features])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [None, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = torch.randn(5, in_features)
    sess = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto)
                                else model, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, (x @ ref.T).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "bits", "group"), [("gptq", 4, 16), ("awq", 4, 32),
                                                       ("rtn", 3, 64)])
def test_quantized_decoder_matches_pytorch_and_generates_the_same(setup, method, bits, group):
    import onnx

    from lighten.llm.onnx_decoder import export_decoder, generate, session
    from lighten.llm.steps import LLMWeightOnlyConfig, quantize_llm_

    tmp, _, data = setup
    model = fresh(setup)
    float_bytes = export_decoder(model, tmp / "float.onnx").bytes
    quantize_llm_(model, LLMWeightOnlyConfig(method=method, bits=bits, group_size=group),
                  calib(data))
    ids = torch.stack([data.test[i][0] for i in range(2)])[:, :12]
    done = export_decoder(model, tmp / f"{method}.onnx", sample_ids=ids)
    assert done.nbits_layers == 14 and done.max_diff < 1e-4 and done.agreement == 1.0
    assert done.bytes < 0.6 * float_bytes
    ops = [n.op_type for n in onnx.load(str(done.path)).graph.node]
    assert ops.count("MatMulNBits") == 14 and "DequantizeLinear" not in ops
    tokens, _ = generate(session(done.path), ids[:, :5].numpy(), 6)
    seq = ids[:, :5]
    with torch.no_grad():  # greedy without a cache, on the PyTorch model
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert np.array_equal(tokens, seq[:, 5:].numpy())


def test_smoothquant_per_token_decoder_and_export(setup):
    import onnx

    import lighten
    from lighten.artifact import load_artifact, save_artifact
    from lighten.export import export_onnx
    from lighten.llm.onnx_decoder import export_decoder
    from lighten.llm.smoothquant import SmoothQuantLinear
    from lighten.llm.steps import LLMSmoothQuantConfig

    tmp, folder, data = setup
    model = fresh(setup)
    x = torch.stack([data.test[i][0] for i in range(4)])
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for act in ("tensor", "token"):
        out, _ = lighten.compress(fresh(setup), LLMSmoothQuantConfig(
            calib_samples=8, reduce_range=False, activations=act), data=data)
        with torch.no_grad():
            errors[act] = float((out(x) - ref).pow(2).mean())
    assert errors["token"] < errors["tensor"]  # one scale per row: outlier rows stay local
    assert all(m.activations == "token" for m in out.modules()
               if isinstance(m, SmoothQuantLinear))
    check = export_onnx(out, tmp / "sq.onnx", inputs=data.task.inputs, sample_inputs=(x,))
    assert check.max_abs_diff < 1e-3 and check.agreement > 0.95
    done = export_decoder(out, tmp / "sq-kv.onnx", sample_ids=x[:1, :10])
    ops = {n.op_type for n in onnx.load(str(done.path)).graph.node}
    assert "MatMulInteger" in ops and done.agreement > 0.9
    save_artifact(out, tmp / "sq.safetensors", model_spec={"hf": str(folder)}, task=data.task,
                  input_shape=data.input_shape, num_classes=data.num_classes)
    again, _ = load_artifact(tmp / "sq.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), out(x))


def test_cli_exports_a_run_stage_with_kv_cache(setup, capsys):
    from lighten.cli.main import main
    from lighten.llm.onnx_decoder import run_decoder, session
    from lighten.recipe import parse_recipe
    from lighten.runner import run_recipe

    tmp, folder, _ = setup
    recipe = {"name": "tiny-llama-kv", "model": {"hf": str(folder)},
              "data": {"name": "text", "path": str(tmp / "t.txt"),
                       "tokenizer": {"hf": str(folder)}, "seq_len": SEQ},
              "deploy": {"latency_runs": 3},
              "steps": [{"llm.weight_only": {"method": "rtn", "bits": 4, "group_size": 32}}]}
    out = tmp / "run"
    run_recipe(parse_recipe(recipe), output=out, overwrite=True, progress=False)
    stage = next((out / "stages").glob("*llm.weight_only.safetensors"))
    assert main(["export", str(stage), "--onnx", str(tmp / "kv.onnx"), "--kv-cache"]) == 0
    said = capsys.readouterr().out
    assert "14 MatMulNBits" in said and "agreement 100.0%" in said
    import onnx

    sess = session(tmp / "kv.onnx")
    logits, present = run_decoder(sess, np.array([[1, 2, 3]]))
    vocab = logits.shape[-1]
    graph = onnx.load(str(tmp / "kv.onnx")).graph
    assert sum(list(i.dims) == [vocab, 64] for i in graph.initializer) == 1  # tied head: one copy
    assert logits.shape[:2] == (1, 3) and present[0].shape[2] == 3
    assert main(["export", str(stage), "--onnx", str(tmp / "kv4.onnx"), "--kv-cache",
                 "--accuracy-level", "4"]) == 0
    levels = {a.i for n in onnx.load(str(tmp / "kv4.onnx")).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    with pytest.raises(Exception, match="KV-cache|decoder"):
        from lighten.llm.onnx_decoder import export_decoder

        export_decoder(torch.nn.Linear(2, 2), tmp / "bad.onnx")
