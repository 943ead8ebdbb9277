"""Stage latency is timed together at the end of a run, in interleaved rounds, with a spread.

No assertion here depends on how fast anything ran: timing is noisy on a shared machine. What is
checked is the bookkeeping (medians and spreads in every row, the seeded order, re-timing on
resume) and the reading of the numbers ("≈" where the spreads overlap).
"""

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from lighten import runner
from lighten.backends import get_backend
from lighten.measure.timing import (
    LatencyStats,
    interleave_orders,
    split_runs,
    time_interleaved,
)
from lighten.recipe import load_recipe
from lighten.report import format_stage_table, latency_text, same_speed, speed_text

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path / "cache"))


def tiny(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 4)).eval()


def write_recipe(tmp_path, *, backend="onnxruntime", runs=6, steps=None):
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    """))
    steps = steps or """
      - prune.magnitude: {sparsity: 0.5}
      - quant.dynamic: {}
    """
    text = textwrap.dedent(f"""
        name: timing
        model: {{python: net.py:build, input_shape: [1, 8, 8]}}
        data: {{name: synthetic, samples: 256, input_shape: [1, 8, 8], num_classes: 4}}
        train: {{epochs: 1, lr: 0.01, batch_size: 32}}
        measure: {{robustness: false, eval_limit: 64}}
        deploy: {{backend: {backend}, threads: 1, latency_runs: {runs}}}
        output: {tmp_path / "out"}
        steps:
    """) + textwrap.indent(textwrap.dedent(steps), "  ")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return load_recipe(path)


def read_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_timed(row):
    for batch in (1, 64):
        median, spread = row[f"latency_ms_b{batch}"], row[f"latency_ms_b{batch}_spread"]
        assert isinstance(median, float) and median > 0
        assert len(spread) == 2 and spread[0] <= median <= spread[1]


# ----------------------------------------------------------------------------- the statistics


def test_latency_runs_are_split_into_rounds():
    assert split_runs(50) == (10, 5)  # the default: 10 rounds of 5 runs
    assert split_runs(3) == (3, 1)  # the smallest deploy.latency_runs
    assert split_runs(20) == (4, 5)
    assert split_runs(200) == (10, 20)
    assert split_runs(1) == (1, 1)
    for total in range(1, 120):
        rounds, per_round = split_runs(total)
        assert rounds * per_round <= total and per_round >= 1


def test_median_and_interquartile_range_of_rounds():
    stats = LatencyStats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats.median == 3.0 and stats.spread == [2.0, 4.0]
    assert stats.rounds == (5.0, 1.0, 3.0, 2.0, 4.0)
    busy = LatencyStats.of([1.0, 1.1, 0.9, 1.0, 50.0])  # one busy round moves neither
    assert busy.median == 1.0 and busy.high == 1.1


def test_interleaving_order_is_deterministic_and_varies_by_round():
    orders = interleave_orders(4, 10, seed=3)
    assert orders == interleave_orders(4, 10, seed=3)
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert len({tuple(o) for o in orders}) > 1  # not one fixed order
    assert len({o[0] for o in orders}) > 1  # no stage always goes first
    assert interleave_orders(4, 10, seed=4) != orders


class Recorded:
    """A backend's compiled model that also notes each timing call (name, batch, runs)."""

    def __init__(self, name, compiled, log):
        self.name, self.compiled, self.log = name, compiled, log

    def latency_ms(self, batch, *, warmup=10, runs=50):
        self.log.append((self.name, batch, runs))
        return self.compiled.latency_ms(batch, warmup=warmup, runs=runs)


def test_models_are_timed_in_the_seeded_interleaved_order(tmp_path):
    backend = get_backend("torch", threads=1)
    names = ["a", "b", "c"]
    log: list = []
    models = [Recorded(n, backend.compile(tiny(8 * (i + 1)), input_shape=SHAPE,
                                          workdir=tmp_path), log)
              for i, n in enumerate(names)]
    timing = time_interleaved(models, runs=9, seed=7)
    assert (timing.rounds, timing.runs_per_round) == (3, 3)
    warm = len(names) * 2  # one untimed warm-up call per model and batch size first
    assert sorted(log[:warm]) == sorted((n, b, 1) for n in names for b in (1, 64))
    expected = [(names[i], b, 3) for order in interleave_orders(3, 3, seed=7)
                for i in order for b in (1, 64)]
    assert log[warm:] == expected
    assert timing.orders == interleave_orders(3, 3, seed=7)
    for i in range(3):
        fields = timing.row_fields(i)
        paired = {"latency_ms_b1_ratio", "latency_ms_b1_ratio_spread", "latency_ms_b64_ratio",
                  "latency_ms_b64_ratio_spread"} if i else set()
        assert set(fields) == {"latency_ms_b1", "latency_ms_b1_spread", "latency_ms_b64",
                               "latency_ms_b64_spread"} | paired
        assert len(timing.stats[64][i].rounds) == 3
        assert_timed(fields)


# ------------------------------------------------------------------------------- the reading


def row(stage, b64, spread, b1=0.05):
    return {"stage": stage, "latency_ms_b1": b1, "latency_ms_b1_spread": [b1 * 0.9, b1 * 1.1],
            "latency_ms_b64": b64, "latency_ms_b64_spread": spread}


def test_speed_inside_the_spread_is_about_equal():
    base = row("baseline", 8.0, [7.5, 8.6])
    assert speed_text(base, row("inside", 8.4, [8.2, 9.0])) == "≈"  # ranges overlap
    assert speed_text(base, row("pruned", 1.9, [1.8, 2.0])) == "4.2x faster"
    assert speed_text(base, row("int8", 17.0, [16.0, 18.0])) == "2.1x slower"
    assert speed_text(base, {"latency_ms_b64": 4.0}) == "2.0x faster"  # no spread: the ratio
    assert speed_text(base, {"latency_ms_b64": None}) == "-"
    assert same_speed([1.0, 2.0], [2.0, 3.0]) is True
    assert same_speed([1.0, 2.0], [2.1, 3.0]) is False
    assert same_speed(None, [1.0, 2.0]) is None
    assert latency_text(base, "latency_ms_b64") == "8.000 ±6.9%"
    assert latency_text({"latency_ms_b64": 2.0}, "latency_ms_b64") == "2.000"


def test_stage_table_prints_about_equal_and_the_spread():
    rows = [row("baseline", 8.0, [7.5, 8.6]), row("prune", 8.2, [7.9, 8.8]),
            row("quant", 2.0, [1.9, 2.1])]
    lines = format_stage_table(rows).splitlines()
    assert "≈" in lines[3] and "faster" not in lines[3] and "slower" not in lines[3]
    assert "4.0x faster" in lines[4]
    assert "8.000 ±6.9%" in lines[2]


# ---------------------------------------------------------------------------- through the runner


def speed_cell(table: str, stage: str) -> str:
    header, _, *body = table.splitlines()
    line = next(line for line in body if line.startswith(stage + " "))
    # cells are separated by two spaces; "≈" and "1.2x faster" are single cells
    cells = [c.strip() for c in line.split("  ") if c.strip()]
    titles = [c.strip() for c in header.split("  ") if c.strip()]
    return cells[titles.index("b64 speed")]


def test_run_times_every_stage_together_and_reports_the_spread(tmp_path):
    result = runner.run_recipe(write_recipe(tmp_path), progress=False)
    out = result.output_dir
    rows = read_rows(out)
    assert [r["stage"] for r in rows] == ["baseline", "prune.magnitude", "quant.dynamic"]
    for r in rows:
        assert_timed(r)
    timing = json.loads((out / "latency.json").read_text())
    assert list(timing["stages"]) == [r["stage"] for r in rows]
    assert (timing["rounds"], timing["runs_per_round"]) == (3, 2)  # latency_runs: 6
    assert timing["orders"] == [[timing_name(rows, i) for i in order]
                                for order in interleave_orders(3, 3, seed=0)]
    for r in rows:  # the row's numbers are the median and IQR of latency.json's rounds
        rounds = timing["stages"][r["stage"]]["b64"]["rounds"]
        assert r["latency_ms_b64"] == pytest.approx(float(np.median(rounds)))
        assert r["latency_ms_b64_spread"] == pytest.approx(list(np.percentile(rounds, [25, 75])))
    # the printed table and the report read the same paired ratios: "≈" exactly where the
    # same-round ratios' IQR holds 1; the ratios are those of the recorded rounds
    table = format_stage_table(rows)
    base_rounds = timing["stages"][timing_name(rows, 0)]["b64"]["rounds"]
    for i, r in enumerate(rows[1:], start=1):
        expected = speed_text(rows[0], r)
        assert speed_cell(table, r["stage"]) == expected
        rounds = timing["stages"][timing_name(rows, i)]["b64"]["rounds"]
        ratios = [a / b for a, b in zip(rounds, base_rounds, strict=True)]
        low, high = np.percentile(ratios, [25, 75])
        assert r["latency_ms_b64_ratio_spread"] == pytest.approx([low, high])
        assert (expected == "≈") == bool(low <= 1.0 <= high)
    report = (out / "report.md").read_text()
    assert "±" in report and "interleaved rounds" in report
    assert (out / "plots" / "accuracy_vs_latency_b64.png").is_file()
    assert (out / "deploy" / "baseline" / "model.onnx").is_file()


def timing_name(rows, index):
    return rows[index]["stage"]


def test_resume_retimes_finished_stages_with_the_rest(tmp_path, monkeypatch):
    two_prunes = """
      - prune.magnitude: {sparsity: 0.5}
      - prune.magnitude: {sparsity: 0.7}
    """
    recipe = write_recipe(tmp_path, steps=two_prunes)
    real_apply = runner.step_apply

    def interrupt(step, model, ctx):
        if step.config.sparsity == 0.7:
            raise KeyboardInterrupt
        return real_apply(step, model, ctx)

    monkeypatch.setattr(runner, "step_apply", interrupt)
    with pytest.raises(KeyboardInterrupt):
        runner.run_recipe(recipe, progress=False)
    out = tmp_path / "out"
    # latency is not taken stage by stage any more: the interrupted run timed nothing
    assert [r["latency_ms_b64"] for r in read_rows(out)] == [None, None]
    assert not (out / "latency.json").exists()

    monkeypatch.setattr(runner, "step_apply", real_apply)
    runner.run_recipe(recipe, resume=True, progress=False)
    first = json.loads((out / "latency.json").read_text())
    stages = ["baseline", "prune.magnitude", "prune.magnitude#2"]
    assert list(first["stages"]) == stages
    for r in read_rows(out):  # the baseline, finished before the interruption, timed with the rest
        assert_timed(r)
        assert r["latency_ms_b1"] == first["stages"][r["stage"]]["b1"]["median"]

    # a step appended to the finished run: the new stage is timed with every finished one,
    # the baseline included (a new timing; all rows from it)
    runner.run_recipe(write_recipe(tmp_path, steps=two_prunes + "  - quant.dynamic: {}\n"),
                      resume=True, progress=False)
    second = json.loads((out / "latency.json").read_text())
    assert second["timed_at"] > first["timed_at"]
    assert list(second["stages"]) == [*stages, "quant.dynamic"]
    rows = read_rows(out)
    assert [r["stage"] for r in rows] == [*stages, "quant.dynamic"]
    for r in rows:
        assert r["latency_ms_b64"] == second["stages"][r["stage"]]["b64"]["median"]
        assert r["latency_ms_b64_spread"] == second["stages"][r["stage"]]["b64"]["spread"]


def test_torch_backend_stages_are_reloaded_from_their_artifacts(tmp_path):
    """The torch backend writes no deployment file: the end-of-run timing compiles the saved
    stage artifacts (ORT and OpenVINO reopen deploy/<stage>/model.onnx)."""
    assert get_backend("torch").load(tmp_path) is None
    result = runner.run_recipe(write_recipe(tmp_path, backend="torch", runs=3,
                                            steps="- prune.magnitude: {sparsity: 0.5}"),
                               progress=False)
    rows = read_rows(result.output_dir)
    assert [r["backend"] for r in rows] == ["torch", "torch"]
    for r in rows:
        assert_timed(r)


def test_onnx_deployments_reopen_without_export(tmp_path):
    model = tiny()
    x = torch.randn(5, *SHAPE)
    backends = ["onnxruntime"]
    try:
        import openvino  # noqa: F401

        backends.append("openvino")
    except ImportError:
        pass
    for name in backends:
        backend = get_backend(name, threads=1)
        workdir = tmp_path / name
        assert backend.load(workdir, input_shape=SHAPE) is None  # nothing written yet
        compiled = backend.compile(model, input_shape=SHAPE, workdir=workdir)
        reopened = backend.load(workdir, input_shape=SHAPE)
        assert reopened.backend == name
        np.testing.assert_allclose(reopened(x.numpy()), compiled(x.numpy()), rtol=1e-5,
                                   atol=1e-6)
        assert reopened.latency_ms(1, warmup=0, runs=1) > 0


def test_paired_ratio_sees_through_load_that_hits_both_models():
    """Busy rounds slow baseline and stage alike: their own spreads overlap, but the stage is
    0.8x the baseline in every round, so it is faster; random same-round jitter around 1 is ≈."""
    from lighten.measure.timing import LatencyStats, Timing
    from lighten.report import speed_text

    load = [1.0, 3.0, 1.2, 2.5, 1.1, 2.8, 1.0, 3.1]  # a shared machine: some rounds are busy
    base = LatencyStats.of(load)
    faster = LatencyStats.of([0.8 * x for x in load])
    jitter = LatencyStats.of([x * f for x, f in zip(load, [1.05, 0.95, 1.02, 0.97, 1.04, 0.98,
                                                           1.01, 0.96], strict=True)])
    timing = Timing({64: [base, faster, jitter]}, [[0, 1, 2]] * 8, 8, 1)
    rows = [timing.row_fields(i) for i in range(3)]
    assert "latency_ms_b64_ratio" not in rows[0]
    assert rows[1]["latency_ms_b64_ratio"] == pytest.approx(0.8)
    assert speed_text(rows[0], rows[1]) == "1.2x faster"  # own spreads overlap; paired do not
    assert speed_text(rows[0], rows[2]) == "≈"


def test_timing_round_trips_through_its_record_and_a_fresh_process(tmp_path):
    """The runner times ONNX deployments in a child process that opens only the files; what it
    sends back (Timing.to_dict) rebuilds the same medians, spreads and orders."""
    from lighten.measure.timing import Timing
    from lighten.measure.timing_worker import time_in_fresh_process
    from lighten.task import ClassificationTask

    backend = get_backend("onnxruntime", threads=1)
    dirs = []
    for i in range(2):
        work = tmp_path / f"s{i}"
        backend.compile(tiny(8 * (i + 1)), input_shape=SHAPE, workdir=work)
        dirs.append(work)
    inputs = ClassificationTask(SHAPE, 10).inputs
    timing = time_in_fresh_process("onnxruntime", 1, dirs, inputs, runs=6, seed=3)
    assert timing is not None and (timing.rounds, timing.runs_per_round) == (3, 2)
    assert timing.orders == interleave_orders(2, 3, seed=3)
    names = [str(d) for d in dirs]
    again = Timing.from_dict(json.loads(json.dumps(timing.to_dict(names))), names)
    assert again.row_fields(1) == timing.row_fields(1)
    assert time_in_fresh_process("torch", 1, dirs, inputs, runs=6, seed=3) is None  # no files
