"""Calibration through the task: a two-input model (``python:`` task) quantized by quant.ptq,
quant.dynamic, quant.mixed and quant.weight_only (gptq) -- every calibration batch reaches
``model(a, b)``, not only ``a`` -- end to end through the runner, exported with two ONNX inputs
and timed on ONNX Runtime."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lighten.errors import DataError
from lighten.quant.layer_report import layer_table
from lighten.quant.mixed import MixedConfig, quantize_mixed_
from lighten.quant.ptq import PTQConfig, quantize_ptq_
from lighten.quant.weight_only import WeightOnlyConfig, quantize_weight_only_
from lighten.recipe import load_recipe
from lighten.runner import run_recipe
from lighten.task import Inputs, batch_inputs
from tests.conftest import write_models_module
from tests.test_task_lm import PAIR_PY, TASKS_PY


def pair_batches(module, n: int = 4, size: int = 32):
    data = module.Pairs(n * size, 3)
    return [Inputs((data.a[i:i + size], data.b[i:i + size])) for i in range(0, n * size, size)]


def test_batch_inputs_tells_inputs_from_pairs():
    a, b, y = torch.zeros(2, 4), torch.ones(2, 3), torch.zeros(2).long()
    assert batch_inputs(a)[0] is a
    assert [t.shape for t in batch_inputs(Inputs((a, b)))] == [(2, 4), (2, 3)]
    assert batch_inputs((a, y))[0] is a and len(batch_inputs((a, y))) == 1  # (x, y) pair
    assert len(batch_inputs(([a, b], y))) == 2  # a DataLoader's collated ((a, b), y)
    with pytest.raises(DataError, match="Inputs"):
        batch_inputs("abc")


def test_two_input_calibration_sees_both_inputs(tmp_path):
    _, pair = write_models_module(tmp_path, "pair_lib", PAIR_PY)
    torch.manual_seed(0)
    model = pair.build().eval()
    batches = pair_batches(pair)
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in batches])
    import copy

    q = quantize_ptq_(copy.deepcopy(model), batches, PTQConfig())
    with torch.no_grad():
        out = torch.cat([q(*b) for b in batches])
    # both branch inputs were calibrated: fb (fed only by b) has a real input range
    assert float(q.fb.act_scale) > 0 and float(q.fa.act_scale) > 0
    snr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert snr > 25, snr
    table = layer_table(model, q, batches)
    assert table.samples == 4 * 32 and {r.name for r in table.rows} == {"fa", "fb", "head"}
    mixed, bits = quantize_mixed_(copy.deepcopy(model), batches,
                                  MixedConfig(candidates=[4, 8], budget_bytes=0.2))
    assert set(bits) == {"fa", "fb", "head"}
    with torch.no_grad():
        assert torch.isfinite(mixed(*batches[0])).all()
    wo = quantize_weight_only_(copy.deepcopy(model), WeightOnlyConfig(bits=4, method="gptq",
                                                                      group_size=None),
                               batches)
    with torch.no_grad():
        err = (torch.cat([wo(*b) for b in batches]) - ref).pow(2).mean()
    assert err < ref.pow(2).mean() * 0.05


@pytest.mark.parametrize("step", ["quant.ptq", "quant.dynamic"])
def test_two_input_model_quantized_through_the_runner(tmp_path, step):
    (tmp_path / "tasks.py").write_text(TASKS_PY)
    (tmp_path / "pair.py").write_text(PAIR_PY)
    recipe = {
        "name": "pair",
        "model": {"python": "pair.py:build", "input_shape": [4]},
        "data": {"python": "pair.py:load", "task": {"python": "tasks.py:make",
                                                     "kwargs": {"classes": 3}}},
        "train": {"epochs": 3, "lr": 0.01, "batch_size": 32},
        "deploy": {"latency_runs": 3},
        "steps": [{step: {}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run_recipe(load_recipe(tmp_path / "r.yaml"), output=out, progress=False)
    base, quant = result.rows
    assert quant["backend"] == "onnxruntime" and quant["latency_ms_b1"] > 0
    assert quant["latency_ms_b64"] > 0
    assert quant["accuracy"] > base["accuracy"] - 0.05 and quant["agreement"] > 0.9
    import onnx

    graph = onnx.load(str(out / "deploy" / step / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["a", "b"]
    ops = {n.op_type for n in graph.node}
    assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}, ops
    if step == "quant.ptq":  # the per-layer table compared both inputs' layers
        layers = json.loads((out / "stages" / "01-quant.ptq.layers.json").read_text())
        names = {row["name"] for row in layers["rows"]}
        assert {"fa", "fb", "head"} <= names


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "openvino"])
def test_two_input_int8_model_runs_and_times_on_every_backend(tmp_path, backend):
    import copy

    from lighten.backends import get_backend
    from lighten.task import InputSpec

    if backend == "openvino":
        pytest.importorskip("openvino")
    _, pair = write_models_module(tmp_path, "pair_be", PAIR_PY)
    torch.manual_seed(0)
    model = pair.build().eval()
    data = pair.Pairs(64, 0)
    q = quantize_ptq_(copy.deepcopy(model), pair_batches(pair),
                      PTQConfig(backend="torch" if backend == "torch" else "onnxruntime"))
    specs = (InputSpec("a", (4,)), InputSpec("b", (3,)))
    compiled = get_backend(backend, threads=1).compile(
        q, inputs=specs, workdir=tmp_path / backend, sample_inputs=(data.a, data.b))
    out = compiled(data.a.numpy(), data.b.numpy())
    with torch.no_grad():
        ref = model(data.a, data.b)
    assert out.shape == (64, 3)
    assert (torch.from_numpy(out).argmax(1) == ref.argmax(1)).float().mean() > 0.9
    assert compiled.latency_ms(1, runs=3) > 0 and compiled.latency_ms(64, runs=3) > 0
