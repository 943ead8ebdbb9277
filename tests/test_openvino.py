"""OpenVINO backend: same logits as PyTorch, int8 QDQ files really execute in int8."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lighten.backends import get_backend
from lighten.errors import BackendError
from lighten.quant import PTQConfig, quantize_ptq_

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed")
SHAPE = (1, 12, 12)


def lenet_like() -> nn.Module:
    """LeNet-5 in miniature: conv-relu-pool twice, then two linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 5),
    ).eval()


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@needs_openvino
def test_float_model_matches_torch_at_any_batch(tmp_path):
    model = lenet_like()
    compiled = get_backend("openvino", threads=1).compile(model, input_shape=SHAPE,
                                                          workdir=tmp_path)
    for batch in (1, 5, 33):
        x = inputs(batch)
        with torch.no_grad():
            ref = model(x).numpy()
        got = compiled(x.numpy())
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert compiled.info["compute_layers"] == 4  # 2 conv + 2 fully connected
    assert compiled.info["int8_layers"] == 0
    assert compiled.bytes_on_disk == (tmp_path / "model.onnx").stat().st_size
    assert 0 < compiled.latency_ms(4, warmup=1, runs=3) < 1000


@needs_openvino
def test_ptq_int8_model_runs_int8_and_matches_fake_quant(tmp_path):
    model = lenet_like()
    calib = inputs(128, seed=2)
    quantize_ptq_(model, [calib[:64], calib[64:]], PTQConfig(calibration="minmax"))
    compiled = get_backend("openvino", threads=1).compile(model, input_shape=SHAPE,
                                                          workdir=tmp_path)
    x = inputs(64, seed=3)
    with torch.no_grad():
        ref = model(x).numpy()  # fake-quant PyTorch: the integer model's reference
    got = compiled(x.numpy())
    # same integer arithmetic, so only float rounding of the rescale differs
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.97
    info = compiled.info
    assert info["compute_layers"] == info["int8_layers"] == 4, info["layer_precisions"]
    assert set(info["layer_precisions"]) <= {"Convolution:u8", "FullyConnected:u8"}


@needs_openvino
def test_compile_file_reads_openvino_ir_and_counts_its_weights(tmp_path):
    import openvino as ov

    model = lenet_like()
    backend = get_backend("openvino", threads=1)
    onnx_model = backend.compile(model, input_shape=SHAPE, workdir=tmp_path)
    ov.save_model(ov.Core().read_model(str(tmp_path / "model.onnx")), str(tmp_path / "m.xml"),
                  compress_to_fp16=False)
    ir = backend.compile_file(tmp_path / "m.xml", input_shape=SHAPE)
    x = inputs(7).numpy()
    np.testing.assert_allclose(ir(x), onnx_model(x), atol=1e-5)
    assert ir.bytes_on_disk == sum((tmp_path / n).stat().st_size for n in ("m.xml", "m.bin"))


@needs_openvino
def test_bad_inputs_are_clear_errors(tmp_path):
    backend = get_backend("openvino", threads=1)
    with pytest.raises(BackendError, match="no model file"):
        backend.compile_file(tmp_path / "missing.onnx", input_shape=SHAPE)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="OpenVINO cannot compile"):
        backend.compile_file(tmp_path / "junk.onnx", input_shape=SHAPE)
    compiled = backend.compile(lenet_like(), input_shape=SHAPE, workdir=tmp_path / "ok")
    with pytest.raises(BackendError, match=r"input shape \(1, 10, 10\)"):
        compiled(np.zeros((2, 1, 10, 10), np.float32))


def test_missing_openvino_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    with pytest.raises(BackendError, match=r"pip install 'lighten\[openvino\]'"):
        get_backend("openvino")


@needs_openvino
def test_recipe_deploys_on_openvino(tmp_path, monkeypatch):
    import json
    import textwrap

    from lighten import runner
    from lighten.recipe import load_recipe

    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(),
                                 nn.Linear(64, 4))
    """))
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""
        name: ov
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 256, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 2, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 128}}
        deploy: {{backend: openvino, latency_runs: 3}}
        output: {tmp_path / "out"}
        steps:
          - quant.ptq: {{bits: 8, calib_samples: 64, backend: openvino}}
    """))
    result = runner.run_recipe(load_recipe(tmp_path / "recipe.yaml"), progress=False)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text()
            .splitlines()]
    assert [(r["stage"], r["backend"]) for r in rows] == [("baseline", "openvino"),
                                                           ("quant.ptq", "openvino")]
    assert rows[1]["agreement"] >= 0.9 and rows[1]["bytes"] < 0.5 * rows[0]["bytes"]
