"""arch.nas successive halving (``rerank:``) and the measured latency-budget check."""

from __future__ import annotations

import csv

import pytest
import torch

import lighten
from lighten.arch.nas import NASConfig
from lighten.data import DataSpec, load_data
from lighten.measure import count_macs
from lighten.models import ZOO

pytest.importorskip("optuna")

SMALL = {"trials": 3, "proxy": {"epochs": 0.25, "train": 64, "holdout": 32},
         "rerank": {"top": 1, "epochs": 0.5, "train": 256, "holdout": 128},
         "finetune": {"epochs": 0}}


@pytest.fixture(scope="module")
def data():
    return load_data(DataSpec(name="digits"))  # 8x8 images, 10 classes


def _resnet():
    torch.manual_seed(0)
    return ZOO["resnet20"](num_classes=10, input_shape=(1, 8, 8))


def _rows(workdir) -> list[dict]:
    with open(next((workdir / "stages").glob("nas-*")) / "candidates.csv") as f:
        return list(csv.DictReader(f))


def test_finalists_are_the_proxy_best_and_the_model_shape_and_the_pick_is_their_best(
        data, tmp_path):
    model = _resnet()
    out, report = lighten.compress(model, NASConfig(target_macs=0.5, **SMALL), data=data,
                                   workdir=tmp_path)
    s = report.summary
    finalists = s["finalists"]
    # the short proxy's best, and the model's own shape at the budget (the uniform contender)
    assert any(f["enqueued"] == "reference" for f in finalists)
    assert 1 <= len(finalists) <= 2
    rows = _rows(tmp_path)
    best_proxy = max((r for r in rows if r["state"] == "complete"),
                     key=lambda r: (float(r["proxy_accuracy"]), -int(r["trial"])))
    assert int(best_proxy["trial"]) in [f["trial"] for f in finalists]
    # the result is the finalist the longer proxy scores best, at the budget
    chosen = max(finalists, key=lambda f: (f["rerank_accuracy"], f["proxy_accuracy"],
                                           -f["trial"]))
    assert s["chosen_trial"] == chosen["trial"] and s["rerank_accuracy"] == \
        chosen["rerank_accuracy"]
    assert not any("no more than the first" in n for n in report.notes)  # 256 > 64 images
    assert count_macs(out, (1, 8, 8)) <= 0.5 * count_macs(model, (1, 8, 8))
    scored = [r for r in rows if r.get("rerank_accuracy")]
    assert sorted(int(r["trial"]) for r in scored) == sorted(f["trial"] for f in finalists)
    # a resumed search keeps the second rung's scores: nothing is trained again
    again = lighten.compress(model, NASConfig(target_macs=0.5, **SMALL), data=data,
                             workdir=tmp_path)[1].summary
    assert again["finalists"] == finalists and again["chosen_trial"] == s["chosen_trial"]


def test_without_rerank_the_short_proxy_picks(data, tmp_path):
    config = NASConfig(target_macs=0.5, **{**SMALL, "rerank": {"top": 0}})
    s = lighten.compress(_resnet(), config, data=data, workdir=tmp_path)[1].summary
    rows = [r for r in _rows(tmp_path) if r["state"] == "complete"]
    best = max(rows, key=lambda r: (float(r["proxy_accuracy"]), -int(r["trial"])))
    assert s["finalists"] == [] and s["chosen_trial"] == int(best["trial"])


def test_latency_finalists_are_timed_with_the_input_model_and_the_pick_fits(data, tmp_path):
    """Under a latency budget every finalist is timed whole together with the input model;
    the pick measured within the budget (less the margin) and the result's check compares it
    with the input model timed in the same rounds, not with a timing taken minutes before."""
    config = NASConfig(target_latency=0.9, latency_runs=6, check_models=1, **SMALL)
    s = lighten.compress(_resnet(), config, data=data, workdir=tmp_path)[1].summary
    for f in s["finalists"]:
        assert f["measured_ms"] > 0 and f["input_measured_ms"] > 0
        assert f["within_budget"] == (
            f["measured_ms"] <= 0.9 * f["input_measured_ms"] * (1 - config.latency_margin))
    chosen = next(f for f in s["finalists"] if f["trial"] == s["chosen_trial"])
    assert chosen["within_budget"] or not any(f["within_budget"] for f in s["finalists"])
    assert s["budget_check_ms"] == pytest.approx(0.9 * s["input_check_ms"])
    assert s["budget_met"] == (s["measured_ms"] <= s["budget_check_ms"])


def test_latency_fit_has_a_per_layer_term_that_dropped_blocks_save():
    """Calibration points of models of two depths: the fit recovers time per layer summed,
    per call and fixed, so a shallow shape is not predicted as slow as a deep one of the same
    layer sum."""
    from lighten.arch.nas_latency import LatencyTable

    a, c, b = 0.95, 0.0005, 0.006
    points = [(x, a * x + c * n + b, n) for x, n in ((0.29, 22), (0.24, 22), (0.13, 22),
                                                     (0.09, 22), (0.05, 8), (0.02, 8))]
    table = LatencyTable("onnxruntime", 1, calibration=points)
    table._fit()
    assert (table.a, table.c, table.b) == pytest.approx((a, c, b), rel=1e-6)
    # full-depth points only cannot tell calls from the constant: the two-term fit
    table = LatencyTable("onnxruntime", 1, calibration=points[:4])
    table._fit()
    assert table.c == 0 and table.a == pytest.approx(a, rel=1e-6)
