"""The benchmark scripts import against today's API and their tables show latency spreads.

Nothing here runs a benchmark: each module is imported, and its table is rendered from rows
built in the test (the numbers a run would store: ``latency_ms_b<B>`` medians and their
``*_spread`` [25th, 75th percentile] across interleaved rounds). A smoke run of every script
is ``python benchmarks/run_all.py --quick``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MODULES = ["bench_timing", "backend_latency", "demo_stages", "recipes_table", "quant_peers",
           "calibration", "prune_peers", "prune_quant", "importance", "run_all"]


@pytest.fixture(scope="module")
def bench():
    """Import a benchmark module by name (the scripts import each other from their folder)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module


def timed(median: float, low: float, high: float, **row) -> dict:
    """A row as the benchmarks store it: b64 (and b1 at a tenth) medians with their IQRs."""
    return {**row, "latency_ms_b64": median, "latency_ms_b64_spread": [low, high],
            "latency_ms_b1": median / 10, "latency_ms_b1_spread": [low / 10, high / 10]}


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_imports(bench, name):
    module = bench(name)
    assert module.__doc__, f"{name} has no docstring"
    if name not in ("bench_timing", "run_all"):
        assert callable(module.main)


def test_cells_show_the_spread_and_approx_where_ranges_overlap(bench):
    bt = bench("bench_timing")
    base = timed(20.0, 19.4, 20.6)
    assert bt.ms_cell(base, "latency_ms_b64") == "20.00 ±3.0%"
    assert bt.ms_cell(base, "latency_ms_b1", 3) == "2.000 ±3.0%"
    assert bt.ms_cell(timed(2.0, 1.0, 3.0), "latency_ms_b64") == "2.00 ±50%"
    assert bt.ms_cell({"latency_ms_b64": 1.5}, "latency_ms_b64") == "1.50"  # no spread stored
    assert bt.ms_cell({}, "latency_ms_b64") == "-"
    assert bt.ratio_cell(base, base) == "1.00x"  # a row against itself
    assert bt.ratio_cell(timed(21.0, 20.5, 21.5), base) == "≈"  # ranges overlap
    assert bt.ratio_cell(timed(40.0, 39.0, 41.0), base) == "2.00x"
    assert bt.ratio_cell({"latency_ms_b64": 40.0}, base) == "2.00x"  # old row: no spread


def test_time_rows_stores_medians_and_spreads_from_interleaved_rounds(bench, tmp_path):
    from lighten.backends import get_backend

    bt = bench("bench_timing")
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval(),
              nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()]
    backend = get_backend("torch", threads=1)
    compiled = [backend.compile(m, input_shape=(1, 4, 4), workdir=tmp_path / str(i))
                for i, m in enumerate(models)]
    rows = [{"name": "small"}, {"name": "large"}]
    how = bt.time_rows(rows, compiled, runs=3)
    for row in rows:
        for batch in (1, 64):
            low, high = row[f"latency_ms_b{batch}_spread"]
            assert 0 < low <= row[f"latency_ms_b{batch}"] <= high
    assert how["b1"] == {"runs": 12, "rounds": 3, "runs_per_round": 4}
    assert how["b64"] == {"runs": 3, "rounds": 3, "runs_per_round": 1}
    assert "3 rounds x 1 runs at b64" in bt.spread_note(how)
    with pytest.raises(ValueError, match="2 rows but 1"):
        bt.time_rows(rows, compiled[:1], runs=3)


def test_backend_latency_table(bench):
    mod = bench("backend_latency")
    rows = [timed(10.0, 9.5, 10.5, model="resnet20", backend="onnxruntime"),
            timed(10.4, 10.2, 10.9, model="resnet20", backend="openvino"),
            timed(40.0, 38.0, 42.0, model="resnet20", backend="torch")]
    lines = mod.table(rows).splitlines()
    assert lines[2] == "| resnet20 | onnxruntime | 1.000 ±5.0% | 10.00 ±5.0% | 4.00x |"
    assert lines[3].endswith("| 10.40 ±3.4% | 3.85x |")
    assert lines[4].endswith("| 40.00 ±5.0% | 1.00x |")
    rows[2] = timed(10.1, 9.0, 11.0, model="resnet20", backend="torch")
    assert mod.table(rows).splitlines()[2].endswith("| ≈ |")


def test_quant_peers_table(bench):
    mod = bench("quant_peers")
    common = {"model": "resnet20", "accuracy": 0.92, "agreement": 1.0, "bytes": 1000,
              "int8_layers": "-"}
    rows = [timed(20.0, 19.0, 21.0, method="float / onnxruntime", runtime="onnxruntime",
                  **common),
            timed(22.0, 21.5, 22.5, method="float / openvino", runtime="openvino", **common),
            timed(12.5, 12.0, 13.0, method="lighten quant.ptq minmax / onnxruntime",
                  runtime="onnxruntime", **common),
            timed(21.0, 20.0, 22.0, method="NNCF int8 / openvino", runtime="openvino",
                  **common),
            {"model": "resnet20", "method": "torch.ao FX PTQ x86 / openvino",
             "runtime": "openvino", "missing": "ONNX export failed"}]
    ceiling = {"onnxruntime": {"ratio": 2.0}, "openvino": {"ratio": 1.5}}
    lines = mod.table(rows, ceiling).splitlines()
    assert "| 12.50 ±4.0% | 1.60x | 1.60x | 80% |" in lines[4]
    assert "| 21.00 ±4.8% | ≈ | ≈ | ≈ |" in lines[5]  # overlaps ORT float and OpenVINO float
    assert lines[6].count("| - ") == 10
    pair = mod._pair(*[_stats(v) for v in ((10.0, 9.0, 11.0), (5.0, 4.5, 5.5))])
    assert pair["ratio"] == 2.0 and not pair["overlap"]
    assert mod.ceiling_text(pair) == "2.00x"
    assert mod.ceiling_text({**pair, "overlap": True}) == "≈ (2.00x)"
    assert mod._ms(pair, "int8") == "5.0 ms ±10%"


def _stats(values):
    from lighten.measure.timing import LatencyStats

    median, low, high = values
    return LatencyStats(median, low, high, (low, median, high))


def test_prune_peers_markdown(bench):
    mod = bench("prune_peers")
    common = {"model": "resnet20", "accuracy": 0.92, "agreement": 1.0, "macs": 31e6,
              "params": 272e3}
    rows = [timed(20.0, 19.0, 21.0, method="baseline", **common),
            timed(11.0, 10.5, 11.5, method="round_to=auto", accuracy_pruned=0.1, **common),
            timed(20.5, 20.0, 21.5, method="unrounded", accuracy_pruned=0.1, **common)]
    how = {"b1": {"rounds": 10, "runs_per_round": 40}, "b64": {"rounds": 10,
                                                              "runs_per_round": 10}}
    text = mod.markdown(rows, 2, how)
    lines = text.splitlines()
    assert lines[4].endswith("| 2.000 ±5.0% | 20.00 ±5.0% | 1.00x |")
    assert lines[5].endswith("| 11.00 ±4.5% | 0.55x |")
    assert lines[6].endswith("| ≈ |")
    assert "10 rounds x 10 runs at b64" in text
    assert not hasattr(mod, "interleaved_latency")  # one timing implementation: the library's


def test_prune_quant_table_and_verdict(bench):
    mod = bench("prune_quant")
    common = {"agreement": 1.0, "bytes": 1000, "macs": 31e6, "params": 272e3, "int8_layers": "-"}
    rows = [timed(20.0, 19.0, 21.0, method=mod.FLOAT, accuracy=0.924, **common),
            timed(9.0, 8.8, 9.2, method=mod.NNCF, accuracy=0.924, **common),
            timed(6.0, 5.8, 6.2, method=f"{mod.PRUNED_INT8} / openvino", accuracy=0.918,
                  **common)]
    lines = mod.table(rows).splitlines()
    assert lines[2].endswith("| 20.00 ±5.0% | 0.45x | - |")
    assert lines[4].endswith("| 6.00 ±3.3% | 1.50x | - |")
    assert "met --" in mod.verdict(rows) and "1.50x NNCF's b64 speed" in mod.verdict(rows)
    rows[2] = timed(8.9, 8.5, 9.3, method=f"{mod.PRUNED_INT8} / openvino", accuracy=0.918,
                    **common)
    verdict = mod.verdict(rows)
    assert "NOT met" in verdict and "≈ NNCF's b64 speed" in verdict
    assert mod.table(rows).splitlines()[4].endswith("| ≈ | - |")


def test_recipes_table_ratio_and_quick_recipe(bench, tmp_path):
    mod = bench("recipes_table")
    stage = {"accuracy": 0.9, "agreement": 1.0, "bytes": 1000, "macs": 100, "seconds": 0,
             "backend": "onnxruntime"}
    base = {**stage, **timed(2.0, 1.9, 2.1), "stage": "baseline"}
    fast = {**stage, **timed(1.0, 0.95, 1.05), "stage": "quant.ptq", "seconds": 3}
    same = {**stage, **timed(2.05, 2.0, 2.2), "stage": "quant.ptq", "seconds": 3}
    results = {"fast": mod.summarize("fast", [base, fast]),
               "same": mod.summarize("same", [base, same])}
    assert results["fast"]["latency_b64_spread"] == [[1.9, 2.1], [0.95, 1.05]]
    lines = mod.to_markdown(results).splitlines()
    assert lines[2].endswith("| 0.50x | 3 |") and lines[3].endswith("| ≈ | 3 |")
    old = {**results["fast"]}
    del old["latency_b64_spread"]  # recipes.json rows written before spreads were recorded
    assert mod.to_markdown({"old": old}).splitlines()[2].endswith("| 0.50x | 3 |")

    recipe = mod.shrink_recipe(BENCHMARKS / "recipes" / "lenet5-channels50.yaml", tmp_path)
    assert recipe.deploy.latency_runs == 3 and not recipe.measure.robustness
    assert recipe.data.limit_train == 512 and recipe.train.epochs == 0.05
    assert recipe.steps[0].config.finetune.epochs == 0.05
    assert Path(recipe.output).parent == tmp_path


def test_run_all_quick_covers_every_script(bench):
    mod = bench("run_all")
    full = {c[0] for c in mod.BENCHMARKS}
    assert full == {c[0] for c in mod.QUICK}
    assert all((BENCHMARKS / name).is_file() for name in full)
    for name in full:  # the full run's time estimate is listed for every script
        assert name in mod.__doc__


def test_ratio_cells_pair_rows_round_by_round(bench):
    """Two rows slowed alike by busy rounds: their own spreads overlap, yet the same-round
    ratio is 0.5 in every round, so the cell says 2.00x, not ≈."""
    timing = bench("bench_timing")
    load = [1.0, 3.0, 1.1, 2.9, 1.0, 3.2]
    slow = {"latency_ms_b64": 2.0, "latency_ms_b64_spread": [1.0, 3.0],
            "latency_ms_b64_rounds": load}
    fast = {"latency_ms_b64": 1.0, "latency_ms_b64_spread": [0.5, 1.5],
            "latency_ms_b64_rounds": [x / 2 for x in load]}
    assert timing.overlap(slow, fast, "latency_ms_b64")
    assert timing.ratio_cell(slow, fast) == "2.00x"
    noisy = {**fast, "latency_ms_b64_rounds": [x * f for x, f in zip(
        load, [1.1, 0.9, 1.05, 0.95, 1.0, 1.02], strict=True)]}
    assert timing.ratio_cell(slow, noisy) == "≈"


def test_time_rows_reopens_deployed_files_in_a_fresh_process(bench, tmp_path):
    """ORT and OpenVINO rows are timed by a child that opens only their files; the rows get
    the same fields as in-process timing, and the footnote says where they were timed."""
    from lighten.backends import get_backend

    bt = bench("bench_timing")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    ort = get_backend("onnxruntime", threads=1).compile(model, input_shape=(1, 4, 4),
                                                        workdir=tmp_path / "ort")
    ov = get_backend("openvino", threads=1).compile_file(ort.onnx_path, input_shape=(1, 4, 4))
    assert ort.deployment() == {"backend": "onnxruntime", "path": str(ort.onnx_path),
                                "threads": 1}
    assert ov.deployment()["backend"] == "openvino" and ov.deployment()["threads"] == 1
    rows = [{"name": "ort"}, {"name": "ov"}]
    how = bt.time_rows(rows, [ort, ov], runs=3)
    assert how["process"].startswith("fresh process")
    assert "in a fresh process" in bt.spread_note(how)
    for row in rows:
        assert len(row["latency_ms_b64_rounds"]) == 3
        low, high = row["latency_ms_b1_spread"]
        assert 0 < low <= row["latency_ms_b1"] <= high
    eager = get_backend("torch", threads=1).compile(model, input_shape=(1, 4, 4),
                                                    workdir=tmp_path / "eager")
    how = bt.time_rows(rows, [ort, eager], runs=3)  # eager has no file: all timed in-process
    assert how["process"].startswith("benchmark process")
