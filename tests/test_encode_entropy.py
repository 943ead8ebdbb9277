"""encode.entropy: ANS-coded artifact streams, bit-exact, near the Shannon bound, any order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from lighten import compress
from lighten.artifact import ENTROPY_FLAG, describe_artifact, load_artifact, save_artifact
from lighten.data import DataSpec, load_data
from lighten.encode.streams import decode_symbols, empirical_bits, encode_symbols
from lighten.errors import CheckpointError, RecipeError
from lighten.models import ModelSpec, build_model
from lighten.recipe import parse_recipe

SPEC = {"zoo": "lenet300"}


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(name="digits"))


@pytest.fixture(scope="module")
def lenet300(digits):
    """LeNet-300-100 on 8x8 digits, trained briefly so its weights are bell-shaped."""
    from lighten.training import TrainConfig, train

    torch.manual_seed(0)
    model = build_model(ModelSpec(zoo="lenet300"), input_shape=digits.input_shape,
                        num_classes=10)
    train(model, digits.train, TrainConfig(epochs=2, lr=0.003, batch_size=64), progress=False)
    return model


def save_both(model, tmp_path, digits):
    """(bytes uncoded, bytes coded, coded path) of ``model`` saved without and with coding."""
    shape = dict(model_spec=SPEC, input_shape=digits.input_shape, num_classes=10)
    plain = model.__class__.__new__(model.__class__)
    plain.__dict__ = {k: v for k, v in model.__dict__.items() if k != ENTROPY_FLAG}
    before = save_artifact(plain, tmp_path / "plain.safetensors", **shape)
    after = save_artifact(model, tmp_path / "coded.safetensors", **shape)
    return before, after, tmp_path / "coded.safetensors"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=0, max_size=3000), st.integers(0, 3))
def test_symbols_round_trip(symbols, skew):
    x = np.asarray(symbols, dtype=np.int64) >> skew  # more repeats, lower entropy
    counts, words = encode_symbols(x)
    assert sum(counts) == len(x)
    assert np.array_equal(decode_symbols(words, counts), x)
    assert 32 * words.size <= empirical_bits(counts) + 64 + 0.01 * len(x)


def test_coded_size_is_within_one_percent_of_the_shannon_bound():
    rng = np.random.default_rng(0)
    mask = (rng.random(200_000) < 0.05).astype(np.int64)  # a 95%-sparse layer's mask
    index = np.clip(np.rint(rng.normal(7.5, 2.5, 50_000)), 0, 15).astype(np.int64)  # 4-bit
    for x in (mask, index):
        counts, words = encode_symbols(x)
        bound = empirical_bits(counts)
        assert bound < 32 * words.size <= 1.01 * bound + 64


STORAGE_CASES = {
    "int8 dense": lambda g: torch.randint(-20, 21, (4000,), generator=g).to(torch.int8),
    "int4 packed": lambda g: torch.randint(-8, 8, (64, 64), generator=g).to(torch.int8),
    "sparse float": lambda g: torch.where(torch.rand(100, 100, generator=g) < 0.1,
                                          torch.randn(100, 100, generator=g), 0.0),
    "palette": lambda g: torch.randn(16, generator=g)[torch.randint(0, 16, (5000,), generator=g)],
    "float": lambda g: torch.randn(3000, generator=g),
    "tiny": lambda g: torch.arange(5, dtype=torch.int64),
}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(sorted(STORAGE_CASES)), min_size=1, max_size=4, unique=True),
       st.integers(0, 2 ** 16))
def test_coded_artifact_round_trips_bit_exactly(tmp_path_factory, cases, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": STORAGE_CASES[c](g) for i, c in enumerate(cases)}
    holder = nn.Module()
    for k, t in tensors.items():
        holder.register_buffer(k, t)
    setattr(holder, ENTROPY_FLAG, True)
    path = tmp_path_factory.mktemp("coded") / "c.safetensors"
    save_artifact(holder, path, model_spec=None)
    skeleton = nn.Module()
    for k, t in tensors.items():
        skeleton.register_buffer(k, torch.zeros_like(t))
    loaded, _ = load_artifact(path, model=skeleton)
    for k, t in tensors.items():
        back = getattr(loaded, k)
        assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8) if back.dim() else
                                                     back, t.view(torch.uint8) if t.dim() else t)
    assert getattr(loaded, ENTROPY_FLAG) is True  # saved again, it stays coded


def _chain(model, steps, data):
    for step in steps:
        model, _ = compress(model, step, data=data)
    return model


@pytest.mark.parametrize("steps, least_gain", [
    ([], 0.1),  # alone: float byte planes (exponents ~3 bits of 8)
    ([{"prune.magnitude": {"sparsity": 0.9}}], 0.2),  # masks ~0.1-0.8 bits of 1, values
    ([{"prune.magnitude": {"sparsity": 0.9}}, {"share.kmeans": {"bits": 4}}], 0.25),
    ([{"quant.weight_only": {"bits": 4, "method": "rtn"}}], 0.05),  # packed int4, scales
    ([{"quant.ptq": {"calib_samples": 64}}], 0.005),  # int8 per channel: ~7.8 bits of 8
])
def test_entropy_coding_after_each_step_reloads_identically(steps, least_gain, lenet300, digits,
                                                            tmp_path):
    model = _chain(lenet300, steps, digits)
    coded, report = compress(model, {"encode.entropy": {}}, data=digits)
    before, after, path = save_both(coded, tmp_path, digits)
    assert after < (1 - least_gain) * before, (before, after)
    s = report.summary
    assert s["bytes_after"] < s["bytes_before"] and s["streams"] == len(
        [r for r in report.layers if r["action"] == "encode"])
    assert s["entropy_bits"] <= s["coded_bits"] <= 1.02 * s["entropy_bits"] + 64 * s["streams"]
    loaded, manifest = load_artifact(path)
    x = torch.randn(8, *digits.input_shape)
    assert torch.equal(loaded(x), coded.eval()(x))
    assert any(e["encoding"] == "entropy" for e in manifest["tensors"].values())
    assert {r["encoding"] for r in describe_artifact(path)} >= {"entropy"}


def test_onnx_export_of_a_coded_model_runs_on_onnxruntime(lenet300, digits, tmp_path):
    from lighten.export import export_onnx

    model = _chain(lenet300, [{"prune.magnitude": {"sparsity": 0.5}}, {"encode.entropy": {}}],
                      digits)
    check = export_onnx(model, tmp_path / "m.onnx", input_shape=digits.input_shape)
    assert check.max_abs_diff < 1e-4


def test_it_is_the_last_step_but_may_follow_quantization():
    base = {"name": "t", "model": {"zoo": "lenet300"}, "data": {"name": "digits"}}
    parse_recipe({**base, "steps": [{"quant.ptq": {}}, {"encode.entropy": {}}]})
    with pytest.raises(RecipeError, match="encode.entropy must be the last step"):
        parse_recipe({**base, "steps": [{"encode.entropy": {}},
                                        {"prune.magnitude": {"sparsity": 0.5}}]})
    with pytest.raises(RecipeError, match="remove finetune"):
        parse_recipe({**base, "steps": [{"encode.entropy": {"finetune": {"epochs": 1}}}]})


def test_a_damaged_coded_stream_is_one_checkpoint_error(lenet300, digits, tmp_path):
    model = _chain(lenet300, [{"prune.magnitude": {"sparsity": 0.9}}, {"encode.entropy": {}}],
                      digits)
    _, _, path = save_both(model, tmp_path, digits)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("#mask"))
    tensors[key] = tensors[key].flip(0).contiguous()  # same size, other words
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="do not decode") as err:
        load_artifact(path)
    assert "\n" not in str(err.value)


def test_deep_compression_benchmark_renders_its_tables():
    """benchmarks/deep_compression.py imports against today's API; its tables show ratio and
    coded bits against the bound from stored rows (no benchmark runs here)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    bench = importlib.import_module("deep_compression")
    stage = {"stage": "encode.entropy", "bytes": 20000, "accuracy": 0.89, "agreement": 0.95,
             "ratio": 53.4, "delta_pts": -0.4}
    result = {"recipe": "dc", "path": "recipes/dc.yaml", "steps": ["encode.entropy"],
              "bits": None, "stages": [stage],
              "streams": [{"tensor": "fc.weight#mask", "kind": "bits", "symbols": 1000,
                           "raw_bytes": 125, "coded_bits": 320, "entropy_bits": 300.0,
                           "model_bytes": 20}],
              "coding": {"bytes_before": 125, "bytes_after": 60, "model_bytes": 20,
                         "entropy_bits": 300.0, "coded_bits": 320, "streams": 1}}
    text = bench.render([result], "python benchmarks/deep_compression.py")
    assert "| dc | encode.entropy | 20,000 | 53.4× | 0.8900 | -0.40 | 0.9500 |" in text
    assert "| fc.weight#mask | bits | 1,000 | 125 | 0.320 | 0.300 | +6.67% |" in text
    assert callable(bench.main) and bench.__doc__


def test_coding_never_makes_the_file_larger(tmp_path):
    """Short streams: counts tables and entries would outweigh the saving, so the file is
    written uncoded (the request is kept: a reload saved again still tries to code)."""
    holder = nn.Module()
    holder.register_buffer("w", torch.arange(40, dtype=torch.int8))
    plain, coded = tmp_path / "plain.safetensors", tmp_path / "coded.safetensors"
    save_artifact(holder, plain, model_spec=None)
    setattr(holder, ENTROPY_FLAG, True)
    save_artifact(holder, coded, model_spec=None)
    assert coded.stat().st_size <= plain.stat().st_size + 64  # + the request in the manifest
    skeleton = nn.Module()
    skeleton.register_buffer("w", torch.zeros(40, dtype=torch.int8))
    loaded, _ = load_artifact(coded, model=skeleton)
    assert torch.equal(loaded.w, holder.w) and getattr(loaded, ENTROPY_FLAG) is True
