"""Deployment backends: same logits across runtimes, real timings, clear errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lighten.backends import BACKENDS, default_threads, get_backend
from lighten.errors import BackendError, ExportError


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


class QDQNet(nn.Module):
    """Int8 fake-quantized activations and weights: ORT should fuse it into integer kernels."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x.flatten(1), 0.05, 0, -128, 127)
        w = torch.fake_quantize_per_tensor_affine(self.fc1.weight, 0.01, 0, -128, 127)
        # Q right after the Gemm: ORT fuses DQ -> Gemm -> Q into QGemm
        x = torch.fake_quantize_per_tensor_affine(F.linear(x, w, self.fc1.bias), 0.05, 0, -128, 127)
        w = torch.fake_quantize_per_tensor_affine(self.fc2.weight, 0.01, 0, -128, 127)
        return F.linear(F.relu(x), w, self.fc2.bias)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyCNN()
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 1, 8, 8))  # non-trivial BN statistics
    return m.eval()


def test_ort_and_torch_agree(model, tmp_path):
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8), dtype=np.float32)
    ort = get_backend("onnxruntime", threads=1).compile(model, input_shape=(1, 8, 8),
                                                          workdir=tmp_path / "ort")
    eager = get_backend("torch", threads=1).compile(model, input_shape=(1, 8, 8),
                                                     workdir=tmp_path / "torch")
    a, b = ort(x), eager(x)
    assert a.shape == b.shape == (5, 4)
    np.testing.assert_allclose(a, b, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(b, model(torch.from_numpy(x)).numpy(), atol=1e-6)
    assert ort.backend == "onnxruntime" and eager.backend == "torch"
    assert ort.bytes_on_disk == (tmp_path / "ort" / "model.onnx").stat().st_size > 0
    assert eager.bytes_on_disk is None
    assert ort.info["threads"] == 1 and "Conv" in ort.info["op_types"]
    assert ort.info["integer_ops"] == []


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_latency_positive(model, tmp_path, name):
    threads_before = torch.get_num_threads()
    compiled = get_backend(name, threads=1).compile(model, input_shape=(1, 8, 8),
                                                    workdir=tmp_path)
    b1 = compiled.latency_ms(1, warmup=1, runs=3)
    b64 = compiled.latency_ms(64, warmup=1, runs=3)
    assert isinstance(b1, float) and isinstance(b64, float)
    assert 0 < b1 < 1000 and 0 < b64 < 1000
    assert torch.get_num_threads() == threads_before  # pinning is undone


def test_quantized_graph_runs_integer_kernels(tmp_path):
    torch.manual_seed(0)
    compiled = get_backend("onnxruntime", threads=1).compile(QDQNet(), input_shape=(16,),
                                                             workdir=tmp_path)
    ops = compiled.info["op_types"]
    assert compiled.info["int8_weight_tensors"] == 2
    assert "QGemm" in compiled.info["integer_ops"], f"no integer kernels in {ops}"
    assert (tmp_path / "model.optimized.onnx").exists()
    assert compiled(np.zeros((3, 16), np.float32)).shape == (3, 4)


def test_compile_reports_export_failure(tmp_path):
    class Spectral(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]

    with pytest.raises(ExportError, match="linalg_svd"):
        get_backend("onnxruntime").compile(Spectral(), input_shape=(3, 3), workdir=tmp_path)


def test_torch_backend_wrong_shape(model, tmp_path):
    with pytest.raises(BackendError, match=r"input shape \(3, 8, 8\)"):
        get_backend("torch").compile(model, input_shape=(3, 8, 8), workdir=tmp_path)


def test_unknown_backend_and_bad_threads():
    with pytest.raises(BackendError, match="onnxruntime, torch"):
        get_backend("tensorrt")
    with pytest.raises(BackendError, match="threads"):
        get_backend("torch", threads=0)
    assert set(BACKENDS) >= {"onnxruntime", "torch"}
    assert get_backend("onnxruntime").threads == default_threads() >= 1


def test_openvino_missing_is_a_clear_error():
    try:
        import openvino  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"pip install 'lighten\[openvino\]'"):
            get_backend("openvino")
    else:
        pytest.skip("openvino is installed")


def test_ort_sessions_stop_spinning_when_a_run_returns(model, tmp_path):
    """Every ORT session lighten times (the backend's, the early-exit segments', peers' files)
    comes from session_options: threads pinned, and worker threads that stop spinning when a run
    returns, so two models timed in turn do not share the cores with each other's spin-waits."""
    from lighten.backends.onnxrt import SESSION_CONFIG, session_options

    compiled = get_backend("onnxruntime", threads=2).compile(model, input_shape=(1, 8, 8),
                                                             workdir=tmp_path / "a")
    again = get_backend("onnxruntime", threads=2).compile_file(tmp_path / "a" / "model.onnx",
                                                              input_shape=(1, 8, 8))
    assert SESSION_CONFIG == {"session.force_spinning_stop": "1"}
    for opts in (compiled._session.get_session_options(), again._session.get_session_options(),
                 session_options(3)):
        assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    assert compiled._session.get_session_options().intra_op_num_threads == 2
    assert session_options(3).intra_op_num_threads == 3
    assert session_options(None).intra_op_num_threads == default_threads()
