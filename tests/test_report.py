"""Stage table and report files from a hand-written run folder."""

import base64
import json

import pytest

from lighten.errors import LightenError
from lighten.report import format_stage_table, human_bytes, read_metrics, write_report

ROWS = [
    {"stage": "baseline", "step": None, "accuracy": 0.9000, "agreement": 1.0, "params": 61706,
     "nonzero_params": 61706, "bytes": 246_000, "macs": 416_520, "latency_ms_b1": 0.20,
     "latency_ms_b64": 4.0, "backend": "onnxruntime", "seconds": 12.5, "energy_uj": 2.10,
     "robust_noise_acc": 0.80, "robust_shift_acc": 0.70},
    {"stage": "prune.magnitude", "step": "prune.magnitude", "accuracy": 0.8950,
     "agreement": 0.97, "params": 61706, "nonzero_params": 9256, "bytes": 61_500,
     "macs": 416_520, "latency_ms_b1": 0.20, "latency_ms_b64": 4.0, "backend": "onnxruntime",
     "seconds": 30.0, "energy_uj": 1.50, "robust_noise_acc": 0.79, "robust_shift_acc": 0.69},
    {"stage": "quant.ptq", "step": "quant.ptq", "accuracy": 0.8930, "agreement": 0.96,
     "params": 61706, "nonzero_params": 9256, "bytes": 20_500, "macs": 416_520,
     "latency_ms_b1": 0.10, "latency_ms_b64": 1.6, "backend": "onnxruntime", "seconds": 3.0,
     "energy_uj": 0.40, "robust_noise_acc": 0.78, "robust_shift_acc": 0.68},
]

RUN = {
    "recipe": {"name": "demo", "model": {"zoo": "lenet5"}, "steps": [{"quant.ptq": {"bits": 8}}],
               "seed": 3},
    "recipe_hash": "0123456789abcdef",
    "provenance": {"versions": {"torch": "2.13.0", "onnxruntime": "1.32.0"},
                   "machine": {"cpu": "Test CPU", "logical_cores": 2}, "seed": 3},
    "notes": ["classifier.5 left in float"],
}


def write_run(path, rows=ROWS, run=RUN):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if run is not None:
        (path / "run.json").write_text(json.dumps(run))
    return path


def test_stage_table_has_every_stage_and_ratios_against_baseline():
    table = format_stage_table(ROWS)
    lines = table.splitlines()
    assert len(lines) == 2 + len(ROWS)  # header, rule, one per stage
    assert lines[2].startswith("baseline") and lines[4].startswith("quant.ptq")
    assert "12.0x smaller" in lines[4]  # 246000 / 20500
    assert "4.0x smaller" in lines[3]
    assert "2.5x faster" in lines[4]  # 4.0 ms / 1.6 ms at batch 64
    assert "-0.70" in lines[4]  # 89.30% - 90.00% in points
    assert "89.30%" in lines[4] and "20.0 KiB" in lines[4]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule are aligned


def test_stage_table_tolerates_missing_values():
    table = format_stage_table([{"stage": "baseline", "accuracy": 0.5}])
    assert "50.00%" in table and "-" in table


def test_human_bytes_units():
    assert human_bytes(512) == "512 B"
    assert human_bytes(2048) == "2.0 KiB"
    assert human_bytes(3 * 1024**2) == "3.0 MiB"


def test_write_report_makes_md_and_self_contained_html(tmp_path):
    out = write_run(tmp_path / "run")
    md, html = write_report(out)
    assert md == out / "report.md" and html == out / "report.html"
    text, page = md.read_text(), html.read_text()
    for needle in ("quant.ptq", "12.0x smaller", "0123456789abcdef", "Test CPU", "2.13.0",
                   "classifier.5 left in float", "robust_noise_acc", "bits: 8"):
        assert needle in text, needle
        assert needle in page, needle
    images = page.split("src='data:image/png;base64,")[1:]
    assert len(images) == 2  # accuracy vs bytes, accuracy vs latency
    png = base64.b64decode(images[0].split("'", 1)[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert (out / "plots" / "accuracy_vs_bytes.png").read_bytes() == png
    assert "plots/accuracy_vs_bytes.png" in text
    assert not [p for p in out.rglob("*.tmp")]  # atomic writes leave no temp files


def test_write_report_without_run_json_says_so(tmp_path):
    md, _ = write_report(write_run(tmp_path / "run", run=None))
    assert "run.json is missing" in md.read_text()


@pytest.mark.parametrize("content, message", [
    (None, "no metrics"),
    ("", "is empty"),
    ('{"stage": "baseline"}\nnot json\n', "metrics.jsonl:2 is not valid JSON"),
    ("[1, 2]\n", "not a JSON object"),
])
def test_unusable_metrics_raise_one_clear_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(LightenError, match=message) as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "report.html").exists()


def test_read_metrics_skips_blank_lines(tmp_path):
    write_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("\n\n")
    assert [r["stage"] for r in read_metrics(tmp_path)] == [r["stage"] for r in ROWS]


def test_baseline_row_has_no_comparison_with_itself():
    baseline = format_stage_table(ROWS).splitlines()[2]
    assert "smaller" not in baseline and "faster" not in baseline and "+0.00" not in baseline


def test_growth_is_reported_as_larger_and_slower():
    rows = [dict(ROWS[0]), dict(ROWS[1], bytes=369_000, latency_ms_b64=10.0)]
    line = format_stage_table(rows).splitlines()[3]
    assert "1.5x larger" in line and "2.5x slower" in line


def layer_row(name, sqnr, **extra):
    return {"name": name, "kind": "WeightOnlyLinear", "weight_bits": 4, "weight_range_bits": 4,
            "activation_bits": "float", "granularity": "group", "group_size": 32,
            "scale_min": 0.01, "scale_median": 0.02, "scale_max": 0.03, "sqnr_db": sqnr,
            "sqnr_in_model_db": sqnr, "compared_with": name, "note": "", **extra}


def test_layer_tables_are_shown_per_stage_worst_sqnr_first(tmp_path):
    out = write_run(tmp_path / "run")
    (out / "stages").mkdir()
    table = {"version": 1, "compared_with": "the stage's input model", "samples": 128,
             "logits_sqnr_db": 21.5, "notes": [],
             "rows": [layer_row("fc1", 30.0), layer_row("fc3", None, note="identical to float"),
                      layer_row("fc2", 12.25)]}
    (out / "stages" / "02-quant.ptq.layers.json").write_text(json.dumps(table))
    md, html = write_report(out)
    text = md.read_text()
    assert "## Quantized layers: quant.ptq (logits SQNR 21.5 dB on 128 test samples)" in text
    assert "Quantized layers: prune.magnitude" not in text  # no table file for that stage
    lines = [ln for ln in text.splitlines() if ln.startswith("| fc")]
    assert [ln.split(" | ")[0] for ln in lines] == ["| fc2", "| fc1", "| fc3"]
    assert "| 4 | float | group 32 |" in lines[0] and "| 12.2 |" in lines[0]
    assert "identical to float" in lines[2]
    assert "<td>fc2</td>" in html.read_text()


def test_unreadable_layer_table_is_named_in_the_report(tmp_path):
    out = write_run(tmp_path / "run")
    (out / "stages").mkdir()
    (out / "stages" / "02-quant.ptq.layers.json").write_text("{not json")
    md, _ = write_report(out)
    assert "02-quant.ptq.layers.json is unreadable" in md.read_text()


def test_a_user_tasks_primary_metric_gets_its_own_column():
    rows = [{"stage": "baseline", "accuracy": None, "neg_mse": -0.6353,
             "primary_metric": "neg_mse", "bytes": 100},
            {"stage": "quant.ptq", "accuracy": None, "neg_mse": -0.7,
             "primary_metric": "neg_mse", "bytes": 50}]
    header, *lines = format_stage_table(rows).splitlines()
    assert header.split()[:4] == ["stage", "acc", "Δacc", "pts"]
    assert header.split()[4] == "neg_mse"
    assert "-0.6353" in lines[1] and "-0.7" in lines[2]
    assert "neg_mse" not in format_stage_table(ROWS)
