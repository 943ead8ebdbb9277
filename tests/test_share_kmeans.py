"""share.kmeans: per-layer codebooks, zeros kept, codebook fine-tuning, palette storage."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lighten import compress
from lighten.artifact import describe_artifact, load_artifact, save_artifact
from lighten.cli.main import main
from lighten.codecs import palette_of, palette_values
from lighten.data import DataSpec, load_data
from lighten.errors import ModelError, RecipeError
from lighten.models import ModelSpec, build_model
from lighten.recipe import parse_recipe
from lighten.share.kmeans import KMeansConfig, SharedWeight, kmeans_1d
from lighten.training import evaluate

SPEC = {"zoo": "lenet300"}


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


@pytest.fixture(scope="module")
def pruned(digits):
    """LeNet-300-100 on 8x8 digits, briefly trained, then 80% of each layer pruned."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(zoo="lenet300"), input_shape=digits.input_shape,
                        num_classes=10)
    from lighten.training import TrainConfig, train

    train(model, digits.train, TrainConfig(epochs=2, lr=0.003, batch_size=64), progress=False)
    out, _ = compress(model, {"prune.magnitude": {"sparsity": 0.8, "scope": "layer"}})
    return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def test_kmeans_1d_finds_the_clusters_and_keeps_few_values_exact():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, -0.2, 0.5, 2.0])
    x = centres[torch.randint(0, 4, (2000,), generator=g)] + 0.01 * torch.randn(2000, generator=g)
    for init in ("linear", "density", "kmeans++"):
        c, index = kmeans_1d(x, 4, init=init)
        assert torch.allclose(c, centres, atol=0.01), init
        assert torch.equal(c[index], c[index].clone()) and index.max() == 3
    few = torch.tensor([3.0, -1.0, 3.0, 0.5])
    c, index = kmeans_1d(few, 8)
    assert torch.equal(c[index], few)  # no more distinct values than centroids: exact


def test_distinct_values_equal_codebook_size_and_zeros_stay_zero(pruned, digits):
    before = weights(pruned)
    out, report = compress(pruned, KMeansConfig(bits={"classifier.1": 4, "classifier.3": 3}),
                           data=digits)
    after = weights(out)
    rows = {r["module"]: r for r in report.layers}
    for name, bits in (("classifier.1", 4), ("classifier.3", 3)):
        w = after[name]
        assert torch.equal(w == 0, before[name] == 0)  # pruned zeros exactly where they were
        distinct = torch.unique(w[w != 0]).numel()
        assert distinct == rows[name]["centroids"] == rows[name]["distinct"] == 2 ** bits
    assert torch.equal(after["classifier.5"], before["classifier.5"])  # not named: float
    assert rows["classifier.5"]["action"] == "keep float"


def test_codebook_finetuning_keeps_assignment_and_moves_centroids(pruned, digits):
    clustered, _ = compress(pruned, {"share.kmeans": {"bits": 3}}, data=digits)
    tuned, _ = compress(clustered, {"share.kmeans": {"bits": 3, "finetune": {
        "epochs": 1, "lr": 0.01}}}, data=digits)
    for name, w0 in weights(clustered).items():
        w1 = weights(tuned)[name]
        assert torch.equal(w0 == 0, w1 == 0)
        v0, a0 = torch.unique(w0, return_inverse=True)
        v1, a1 = torch.unique(w1, return_inverse=True)
        pairs = torch.unique(a0.reshape(-1) * len(v1) + a1.reshape(-1))
        assert len(v0) == len(v1) == len(pairs) <= 9  # same partition of the weights
        assert not torch.equal(v0, v1)  # the shared values themselves trained


def test_codebook_gradient_is_the_sum_over_its_weights():
    index = torch.tensor([[0, 1, 2], [2, 2, 1]])
    shared = SharedWeight(index, 2)
    codebook = torch.tensor([0.5, -1.0], requires_grad=True)
    weight = shared(codebook)
    assert weight.tolist() == [[0.0, 0.5, -1.0], [-1.0, -1.0, 0.5]]
    upstream = torch.arange(6.0).reshape(2, 3)
    weight.backward(upstream)
    assert codebook.grad.tolist() == [1.0 + 5.0, 2.0 + 3.0 + 4.0]
    assert torch.equal(shared.right_inverse(weight.detach()), codebook.detach())


def test_artifact_bytes_drop_by_the_index_width_and_reload_is_identical(pruned, digits,
                                                                          tmp_path):
    out, _ = compress(pruned, {"share.kmeans": {"bits": 4}}, data=digits)
    shape = dict(model_spec=SPEC, input_shape=digits.input_shape, num_classes=10)
    dense = save_artifact(pruned, tmp_path / "sparse.safetensors", **shape)
    small = save_artifact(out, tmp_path / "kmeans.safetensors", **shape)
    rows = {r["name"]: r for r in describe_artifact(tmp_path / "kmeans.safetensors")}
    for name, w in weights(out).items():
        row = rows[f"{name}.weight"]
        nnz, k = int((w != 0).sum()), torch.unique(w[w != 0]).numel()
        assert row["encoding"] == "sparse_palette"
        assert row["bytes"] == math.ceil(w.numel() / 8) + math.ceil(nnz * 4 / 8) + 4 * k
    # float32 values -> 4-bit indices: the weight payload shrinks ~8x, masks and biases stay
    assert small < dense / 3
    loaded, manifest = load_artifact(tmp_path / "kmeans.safetensors")
    x = torch.randn(16, *digits.input_shape)
    assert torch.equal(loaded(x), out.eval()(x))
    assert manifest["tensors"]["classifier.1.weight"]["bits"] == 4


def test_bias_bits_and_float16_shrink_the_artifact_and_reload_exactly(pruned, digits,
                                                                      tmp_path):
    plain, _ = compress(pruned, {"share.kmeans": {"bits": 4}}, data=digits)
    small, report = compress(pruned, {"share.kmeans": {
        "bits": 4, "bias_bits": 3, "float16": True, "finetune": {"epochs": 0.2, "lr": 0.01}}},
        data=digits)
    rows = {r["module"]: r for r in report.layers}
    for name, module in small.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w, b = module.weight.detach(), module.bias.detach()
        assert torch.equal(w == 0, pruned.get_submodule(name).weight == 0)
        assert torch.unique(b).numel() == rows[name]["bias_distinct"] <= 8  # 3-bit biases
        assert torch.unique(w[w != 0]).numel() <= 16
        for t in (w, b):  # every value a float16: the artifact stores the tables in half
            assert torch.equal(t.half().float(), t)
    shape = dict(model_spec=SPEC, input_shape=digits.input_shape, num_classes=10)
    big = save_artifact(plain, tmp_path / "plain.safetensors", **shape)
    size = save_artifact(small, tmp_path / "small.safetensors", **shape)
    biases = sum(m.bias.numel() for m in small.modules() if isinstance(m, nn.Linear))
    assert size < big - 2 * biases  # float32 biases -> 3-bit palette indices
    loaded, _ = load_artifact(tmp_path / "small.safetensors")
    x = torch.randn(16, *digits.input_shape)
    assert torch.equal(loaded(x), small.eval()(x))
    assert evaluate(small, digits.test) > evaluate(plain, digits.test) - 0.05


def test_float16_halves_batchnorm_bytes_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(10))
    x = torch.randn(8, 1, 6, 6)
    model(x)  # materialise the lazy layer
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].running_mean.normal_()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    model.eval()
    full, _ = compress(model, {"share.kmeans": {"bits": 4}})
    half, _ = compress(model, {"share.kmeans": {"bits": 4, "float16": True}})
    bn = half[1]
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert torch.equal(t.half().float(), t)
    assert (half(x) - full(x)).abs().max() < 1e-2  # float16 rounding only
    big = save_artifact(full, tmp_path / "full.safetensors", model_spec=None)
    small = save_artifact(half, tmp_path / "half.safetensors", model_spec=None)
    assert small <= big - 2 * 4 * 32  # four BatchNorm vectors of 32 values: 2 bytes each less
    loaded, _ = load_artifact(tmp_path / "half.safetensors")
    assert torch.equal(loaded(x), half(x))


def test_onnx_export_runs_on_onnxruntime(pruned, digits, tmp_path):
    from lighten.export import export_onnx

    out, _ = compress(pruned, {"share.kmeans": {"bits": 2}}, data=digits)
    check = export_onnx(out, tmp_path / "m.onnx", input_shape=digits.input_shape)
    assert check.max_abs_diff < 1e-4 and check.agreement == 1.0


def test_auto_bits_fit_the_budget(pruned, digits):
    out, report = compress(pruned, {"share.kmeans": {"bits": "auto", "budget_bytes": 0.1,
                                                     "candidates": [2, 3, 4, 6],
                                                     "calib_samples": 64}}, data=digits)
    bits = report.summary["bits"]
    nnz = {n: int((w != 0).sum()) for n, w in weights(pruned).items()}
    assert set(bits) == set(nnz) and set(bits.values()) <= {2, 3, 4, 6}
    assert sum(math.ceil(nnz[n] * b / 8) for n, b in bits.items()) <= 0.1 * 4 * sum(nnz.values())
    for name, w in weights(out).items():
        assert torch.unique(w[w != 0]).numel() <= 2 ** bits[name]


@pytest.mark.parametrize("options, message", [
    ({"bits": 9}, "bits 9 is not supported"),
    ({"bits": "auto"}, "bits: auto needs budget_bytes"),
    ({"bits": 4, "budget_bytes": 0.1}, "budget_bytes only applies with bits: auto"),
    ({"bits": 4, "init": "random"}, "init"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(RecipeError, match=message) as err:
        parse_recipe({"name": "t", "model": {"zoo": "lenet5"}, "data": {"name": "digits"},
                      "steps": [{"share.kmeans": options}]})
    assert "\n" not in str(err.value)


def test_unknown_layer_and_after_quantization_are_refused(pruned, digits):
    with pytest.raises(ModelError, match="'fc9'.*layers: classifier.1"):
        compress(pruned, {"share.kmeans": {"bits": {"fc9": 4}}}, data=digits)
    with pytest.raises(RecipeError, match="cannot follow steps\\[0\\] quant.ptq"):
        parse_recipe({"name": "t", "model": {"zoo": "lenet5"}, "data": {"name": "digits"},
                      "steps": [{"quant.ptq": {}}, {"share.kmeans": {"bits": 4}}]})


MODEL = '''
from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
'''


def test_deep_compression_chain_through_lighten_run_on_a_python_model(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    out = tmp_path / "out"
    (tmp_path / "dc.yaml").write_text(textwrap.dedent(f"""
        name: dc-tiny
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {{name: digits}}
        train: {{epochs: 1, lr: 0.003, batch_size: 64}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: onnxruntime, latency_runs: 3}}
        output: {out}
        steps:
          - prune.magnitude: {{sparsity: 0.8, finetune: {{epochs: 0.5}}}}
          - share.kmeans: {{bits: 3, finetune: {{epochs: 0.5, distill: 0.5}}}}
          - encode.entropy: {{}}
    """))
    assert main(["run", str(tmp_path / "dc.yaml"), "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sizes = [r["bytes"] for r in rows]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]  # dense > sparse > clustered > coded
    model, _ = load_artifact(out / "stages" / "02-share.kmeans.safetensors")
    for m in (model[1], model[3]):
        assert torch.unique(m.weight[m.weight != 0]).numel() <= 8


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), distinct=st.integers(1, 20), zeros=st.floats(0, 0.95),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8,
                              torch.int32, torch.float64]),
       seed=st.integers(0, 2 ** 16))
def test_palette_storage_round_trips_bit_exactly(tmp_path_factory, size, distinct, zeros, dtype,
                                                 seed):
    g = torch.Generator().manual_seed(seed)
    table = (torch.randn(distinct, generator=g) * 50).to(dtype)
    if dtype.is_floating_point and distinct > 2:
        table[0], table[1] = float("nan"), -0.0  # bit patterns, not values, are kept
    t = table[torch.randint(0, distinct, (size,), generator=g)]
    t[torch.rand(size, generator=g) < zeros] = 0
    found = palette_of(t)
    assert found is not None
    assert torch.equal(palette_values(*found).view(torch.uint8), t.view(torch.uint8))

    holder = nn.Module()
    holder.register_buffer("t", t.clone())
    path = tmp_path_factory.mktemp("pal") / "p.safetensors"
    save_artifact(holder, path, model_spec=None)
    skeleton = nn.Module()
    skeleton.register_buffer("t", torch.zeros_like(t))
    loaded, manifest = load_artifact(path, model=skeleton)
    back = loaded.t
    if manifest["tensors"]["t"]["encoding"].startswith("sparse"):
        t = torch.where(t == 0, torch.zeros_like(t), t)  # sparse encodings give -0.0 as +0.0
    assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
