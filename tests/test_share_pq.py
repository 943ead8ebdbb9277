"""share.pq: codebooks of 2^b centroids and codes per sub-vector, error falling with bits, pruned
sub-vectors exactly zero, codebook fine-tuning with fixed codes, artifact bytes near codes +
codebook, reload identical, ONNX (a Gather over the codes) on ONNX Runtime, recipe + verb."""

from __future__ import annotations

import copy
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import lighten
from lighten.artifact import describe_artifact, load_artifact, save_artifact
from lighten.cli.main import main
from lighten.data import DataSpec, load_data
from lighten.errors import UnsupportedError
from lighten.export import export_onnx
from lighten.share.pq import PQConfig, PQConv2d, PQLinear, kmeans, product_quantize_


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_codebook_sizes_codes_and_distinct_values():
    model = _net()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    rows = product_quantize_(model, PQConfig(codebook_bits=4))
    conv, fc = model[2], model[5]
    assert isinstance(conv, PQConv2d) and isinstance(fc, PQLinear)
    assert conv.codebook.shape == (1, 16, 9) and conv.codes.shape == (32, 8)  # a code per kernel
    assert fc.codebook.shape == (1, 16, 4) and fc.codes.shape == (64, 512)
    for layer in (conv, fc):
        assert layer.codes.dtype == torch.uint8 and int(layer.codes.max()) < 16
        w = layer.reconstruct().detach()
        subs = w.reshape(w.shape[0], -1, layer.subvector).reshape(-1, layer.subvector)
        assert len(torch.unique(subs, dim=0)) <= 16
    # the first conv has 8 kernels: fewer than 16 centroids, left dense with the reason
    assert type(model[0]) is nn.Conv2d
    assert any(r["module"] == "0" and "sub-vectors" in r["reason"] for r in rows)
    assert _rel(fc.reconstruct().detach(), dense["5"]) < 0.9


def test_error_falls_with_codebook_bits():
    errors = []
    for bits in (2, 4, 6, 8):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 64))  # 4096 sub-vectors of 4
        w = model[0].weight.detach().clone()
        product_quantize_(model, PQConfig(codebook_bits=bits, iterations=15))
        errors.append(_rel(model[0].reconstruct().detach(), w))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_kmeans_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 4, generator=g) * 10
    x = centers.repeat(50, 1) + 0.01 * torch.randn(400, 4, generator=g)
    found, assign = kmeans(x, 8)
    assert len(torch.unique(assign)) == 8
    assert torch.cdist(centers, found).min(1).values.max() < 0.05


def test_weighted_lowers_the_output_error():
    """Under anisotropic inputs the activation-weighted codebook reconstructs the layer's
    *output* better than plain k-means on the weights."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 128, bias=False)
    scale = torch.logspace(0, -3, 64)  # input features of very different magnitudes
    x = torch.randn(512, 64) * scale
    ref = layer(x).detach()
    out = {}
    for weighted in (False, True):
        model = nn.Sequential(copy.deepcopy(layer))
        product_quantize_(model, PQConfig(codebook_bits=5, weighted=weighted),
                          batches=[x[:256], x[256:]])
        out[weighted] = _rel(model(x).detach(), ref)
    assert out[True] < 0.93 * out[False]  # measured 0.382 vs 0.427


def test_pruned_subvectors_stay_exactly_zero_through_finetune():
    model = _net()
    with torch.no_grad():
        model[2].weight[:, :3] = 0  # 3 of 8 input kernels of every filter pruned
    data = load_data(DataSpec(name="synthetic", samples=64, input_shape=[1, 8, 8]))
    out, report = lighten.compress(model, PQConfig(codebook_bits=4,
                                                   finetune={"epochs": 1, "lr": 0.05}),
                                   data=data)
    conv = out[2]
    assert conv.zero_code and (conv.codes[:, :3] == 0).all() and (conv.codes[:, 3:] > 0).all()
    w = conv.reconstruct().detach()
    assert (w[:, :3] == 0).all() and (w[:, 3:] != 0).any()
    # rounded to half precision after fine-tuning (the artifact stores it in two bytes each)
    assert torch.equal(conv.codebook.half().float(), conv.codebook)


def test_finetune_trains_codebooks_with_codes_fixed():
    data = load_data(DataSpec(name="synthetic", samples=128, input_shape=[1, 8, 8]))
    base, _ = lighten.compress(_net(), PQConfig(codebook_bits=4, codebook_dtype="float32"),
                               data=data)
    tuned, _ = lighten.compress(_net(), PQConfig(codebook_bits=4, codebook_dtype="float32",
                                                 finetune={"epochs": 2, "lr": 0.05}),
                                data=data)
    assert torch.equal(base[5].codes, tuned[5].codes)
    assert not torch.equal(base[5].codebook, tuned[5].codebook)
    assert base[5].codebook.dtype == torch.float32


def test_artifact_bytes_drop_to_codes_plus_codebook(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    dense = save_artifact(model, tmp_path / "dense.safetensors", model_spec=None)
    product_quantize_(model, PQConfig(codebook_bits=4, linear_subvector=4, ignore=["2"]))
    from lighten.share.pq import store_codebooks_

    store_codebooks_(model)
    small = save_artifact(model, tmp_path / "pq.safetensors", model_spec=None)
    # the 512x256 weight: 32768 4-bit codes (16 KiB) + a 16x4 float16 codebook, no float weight
    rows = {r["name"]: r for r in describe_artifact(tmp_path / "pq.safetensors")}
    assert rows["0.codes"]["encoding"] == "packed_bits" and rows["0.codes"]["bytes"] == 16384
    assert "0.weight" not in rows
    expected = dense - 512 * 256 * 4 + 16384 + 16 * 4 * 2
    assert abs(small - expected) < 1024
    assert dense / small > 6  # the 256x10 head and the biases stay float

    loaded, _ = load_artifact(tmp_path / "pq.safetensors")
    x = torch.randn(16, 512)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_onnx_gathers_the_codes_and_runs_on_onnxruntime(tmp_path):
    import onnx

    model = _net()
    product_quantize_(model, PQConfig(codebook_bits=6))
    check = export_onnx(model, tmp_path / "pq.onnx", input_shape=(1, 8, 8))
    assert check.max_abs_diff < 1e-4 and check.agreement == 1.0
    graph = onnx.load(str(tmp_path / "pq.onnx")).graph
    assert "Gather" in {n.op_type for n in graph.node}
    assert not any(list(i.dims) == [64, 2048] for i in graph.initializer)  # no dense fc weight


def test_subspace_codebooks_and_refusals():
    model = _net()
    product_quantize_(model, PQConfig(codebook="subspace", codebook_bits=4, ignore=["2"]))
    assert model[5].codebook.shape == (512, 16, 4)  # one codebook per column block
    with pytest.raises(UnsupportedError, match="no Conv2d/Linear"):
        product_quantize_(nn.Sequential(nn.Linear(4, 2)), PQConfig())
    with pytest.raises(UnsupportedError, match="no module named"):
        product_quantize_(_net(), PQConfig(ignore=["nope"]))
    with pytest.raises(UnsupportedError, match="calibration inputs"):
        product_quantize_(_net(), PQConfig(weighted=True, codebook_bits=4))


def test_min_share_gives_small_layers_fewer_bits():
    model = _net()
    rows = {r["module"]: r for r in product_quantize_(model, PQConfig(
        codebook_bits=8, min_share=16, iterations=2))}
    assert rows["2"]["codebook_bits"] == 4  # 256 kernels / 16 per centroid
    assert rows["5"]["codebook_bits"] == 8  # 32768 sub-vectors: the cap


MODELS = '''
from torch import nn


def net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
'''


@pytest.mark.parametrize("model", ["{zoo: lenet5}",
                                   "{python: models.py:net, input_shape: [1, 8, 8]}"])
def test_prune_then_pq_through_lighten_run(tmp_path, monkeypatch, model):
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""
        name: pq
        model: {model}
        data: {{name: digits}}
        train: {{epochs: 1, lr: 0.01, batch_size: 64}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: out
        steps:
          - prune.channels: {{ratio: 0.25}}
          - share.pq: {{codebook_bits: 4, min_share: 4, weighted: true,
                        calibration_samples: 64, finetune: {{epochs: 0.5}}}}
    """))
    assert main(["run", "r.yaml", "--quiet"]) == 0
    rows = [__import__("json").loads(line) for line in (tmp_path / "out/metrics.jsonl")
            .read_text().splitlines()]
    assert [r["stage"] for r in rows][-1] == "share.pq"
    assert rows[-1]["bytes"] < 0.5 * rows[0]["bytes"]
    reloaded, _ = load_artifact(tmp_path / "out/stages/02-share.pq.safetensors")
    assert any(isinstance(m, (PQConv2d, PQLinear)) for m in reloaded.modules())
    x = torch.randn(8, 1, 8, 8)
    session = ort.InferenceSession(str(tmp_path / "out/deploy/share.pq/model.onnx"),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0],
                                   reloaded(x).numpy(), atol=1e-4)
