"""The bookkeeping of benchmarks/llm.py's peers on a tiny random Llama: ONNX Runtime's own 4-bit
quantizer runs on our exported float KV-cache decoder (every block Linear one MatMulNBits, the
tied head left float) and the float decoder through ORT gives PyTorch's perplexity on the same
windows; the peers calibrate on the very windows lighten's steps do; and
benchmarks/llm_generate.py times every form once per interleaved round."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch
from _llm_common import tiny_llama, write_text

from lighten.data import DataSpec, load_data
from lighten.models import ModelSpec, build_model

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def llm():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import llm

    return llm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llmpeers")
    folder = tiny_llama(tmp / "model")
    write_text(tmp / "t.txt")
    data = load_data(DataSpec(name="text", path=str(tmp / "t.txt"),
                              tokenizer={"hf": str(folder)}, seq_len=16))
    model = build_model(ModelSpec(hf=str(folder)), input_shape=data.input_shape,
                        num_classes=data.num_classes, task=data.task)
    return model.eval(), data


@pytest.mark.parametrize("name", ["ort_rtn", "ort_hqq"])
def test_ort_quantizer_peer_on_our_float_decoder(llm, setup, name):
    model, data = setup
    row = llm.run_ort_peer(model, data, name, argparse.Namespace(threads=1))
    layers = len(model.hf.model.layers)
    assert row["nbits_nodes"] == 7 * layers  # q k v o gate up down; the Gemm head stays float
    float_ppl = llm.perplexity(model, data.test)
    if name == "ort_rtn":
        assert row["ort_float_perplexity"] == pytest.approx(float_ppl, rel=1e-4)
    assert math.isfinite(row["perplexity"]) and row["perplexity"] != float_ppl
    assert row["bytes"] > 0 and row["calib_peak_rss_mb"] > 0


def test_peers_calibrate_on_the_windows_lighten_calibrates_on(llm, setup):
    from lighten.step import StepContext
    from lighten.training import TrainConfig

    _, data = setup
    ctx = StepContext(data=data, train_config=TrainConfig(), baseline=None, workdir=None)
    ours = torch.cat(list(ctx.calibration_batches(6, 4)))
    assert torch.equal(llm.calib_ids(data, 6), ours)


def test_generation_forms_are_timed_in_interleaved_rounds(llm):
    import llm_generate

    calls: list[int] = []

    def form(i):
        def run():
            calls.append(i)
            return float(i + 1), None
        return run

    seconds = llm_generate.time_rounds([form(i) for i in range(3)], rounds=4)
    assert seconds == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
    assert calls[:3] == [0, 1, 2]  # one untimed warm-up each, then 4 rounds of all three
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds) and len({tuple(r) for r in rounds}) > 1
