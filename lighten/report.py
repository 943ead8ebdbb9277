"""Turn a run's ``metrics.jsonl`` + ``run.json`` into a terminal table, report.md and report.html.

The report is the proof a compression worked, so it shows every number against the baseline
(first row) and says where they came from (versions, machine, recipe hash, seed). The HTML file
embeds its plots so it can be mailed or attached to an issue as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lighten.errors import ReportError
from lighten.provenance import atomic_write_bytes

# Keys every metrics row has (docs/ARCHITECTURE.md); anything else is an extra column.
CORE_KEYS = (
    "stage", "step", "accuracy", "agreement", "params", "nonzero_params", "bytes", "macs",
    "latency_ms_b1", "latency_ms_b64", "backend", "seconds",
)


# ----------------------------------------------------------------------------------- formatting


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    units, i = ("B", "KiB", "MiB", "GiB"), 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ratio(base: float | None, value: float | None, better: str, worse: str) -> str:
    """'12.3x smaller' when ``value`` is below ``base``, '1.2x larger' when above."""
    if not base or not value:
        return "-"
    if value <= base:
        return f"{base / value:.1f}x {better}"
    return f"{value / base:.1f}x {worse}"


def _is_spread(value: object) -> bool:
    return (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))


def same_speed(spread_a: Sequence[float] | None, spread_b: Sequence[float] | None
               ) -> bool | None:
    """True when two latency spreads ``[low, high]`` (``latency_ms_b*_spread``: the IQR across
    the interleaved timing rounds, ``lighten.measure.timing``) overlap: the difference of the
    medians is inside the noise. False when they are apart; None when either is missing (rows
    written before spreads were recorded)."""
    if not _is_spread(spread_a) or not _is_spread(spread_b):
        return None
    return spread_a[0] <= spread_b[1] and spread_b[0] <= spread_a[1]


def speed_text(base: dict, row: dict, key: str = "latency_ms_b64") -> str:
    """The speed of ``row`` against ``base`` at one batch size. With the paired ratio
    (``<key>_ratio_spread``: the row's time / the baseline's in the same timing round, IQR
    across rounds): "≈" where that range holds 1, else its median as "2.3x faster" / "1.4x
    slower". Rows without it fall back to whether the two latency spreads overlap."""
    if base.get(key) is None or row.get(key) is None:
        return "-"
    paired = row.get(f"{key}_ratio_spread")
    if _is_spread(paired) and row.get(f"{key}_ratio"):  # same-round ratios to the baseline
        if paired[0] <= 1.0 <= paired[1]:
            return "≈"
        return _ratio(1.0, row[f"{key}_ratio"], "faster", "slower")
    if same_speed(base.get(f"{key}_spread"), row.get(f"{key}_spread")):
        return "≈"
    return _ratio(base.get(key), row.get(key), "faster", "slower")


def latency_text(row: dict, key: str) -> str:
    """Milliseconds with the spread as ± half the IQR in percent of the median: "0.639 ±2.1%"
    (no ± where the row has no spread)."""
    value, spread = row.get(key), row.get(f"{key}_spread")
    if value is None:
        return "-"
    if not _is_spread(spread) or not value:
        return _ms(value)
    half = 100 * (spread[1] - spread[0]) / 2 / value
    return f"{value:.3f} ±{half:.1f}%" if half < 9.95 else f"{value:.3f} ±{half:.0f}%"


def _delta_points(base: float | None, value: float | None) -> str:
    if base is None or value is None:
        return "-"
    return f"{100 * (value - base):+.2f}"


@dataclass(frozen=True)
class Column:
    title: str
    cell: Callable[[dict, dict], str]  # (row, baseline row) -> text
    left: bool = False
    relative: bool = False  # compares with the baseline: blank on the baseline row itself


STAGE_COLUMNS = (
    Column("stage", lambda r, b: str(r.get("stage", "?")), left=True),
    Column("acc", lambda r, b: _pct(r.get("accuracy"))),
    Column("Δacc pts", lambda r, b: _delta_points(b.get("accuracy"), r.get("accuracy")),
           relative=True),
    Column("agree", lambda r, b: _pct(r.get("agreement"))),
    Column("params", lambda r, b: human_count(r.get("params"))),
    Column("non-zero", lambda r, b: human_count(r.get("nonzero_params"))),
    Column("bytes", lambda r, b: human_bytes(r.get("bytes"))),
    Column("size", lambda r, b: _ratio(b.get("bytes"), r.get("bytes"), "smaller", "larger"),
           relative=True),
    Column("MACs", lambda r, b: human_count(r.get("macs"))),
    Column("b1 ms", lambda r, b: latency_text(r, "latency_ms_b1")),
    Column("b64 ms", lambda r, b: latency_text(r, "latency_ms_b64")),
    Column("b64 speed", lambda r, b: speed_text(b, r, "latency_ms_b64"), relative=True),
    Column("energy µJ", lambda r, b: "-" if r.get("energy_uj") is None
           else f"{r['energy_uj']:.2f}"),
    Column("sec", lambda r, b: "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"),
)


# language models (lighten.task.LanguageModelTask): perplexity next to (next-token) accuracy
PERPLEXITY_COLUMN = Column("ppl", lambda r, b: "-" if r.get("perplexity") is None
                           else f"{r['perplexity']:.3f}")


def _metric_column(key: str) -> Column:
    """A task's own primary metric (``Task.primary``), as its value."""
    return Column(key, lambda r, b: "-" if not isinstance(r.get(key), (int, float))
                  else f"{r[key]:.4g}")


def _columns(rows: Sequence[dict]) -> tuple[Column, ...]:
    """The stage columns, with perplexity (a language model) or a user task's primary metric
    after accuracy where the rows have it."""
    extra = [PERPLEXITY_COLUMN] if any(r.get("perplexity") is not None for r in rows) else []
    extra += [_metric_column(k) for k in dict.fromkeys(
        r["primary_metric"] for r in rows if r.get("primary_metric"))]
    return (*STAGE_COLUMNS[:3], *extra, *STAGE_COLUMNS[3:]) if extra else STAGE_COLUMNS


def _cells(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    base = rows[0] if rows else {}
    columns = _columns(rows)
    body = [["-" if c.relative and i == 0 else c.cell(r, base) for c in columns]
            for i, r in enumerate(rows)]
    return [c.title for c in columns], body


def format_table(header: Sequence[str], body: Sequence[Sequence[str]], *,
                 left: Sequence[bool] = ()) -> str:
    """Fixed-width text table; columns flagged in ``left`` are left-aligned, others right."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    left = list(left) + [False] * (len(header) - len(left))

    def line(cells):
        return "  ".join(str(c).ljust(w) if lf else str(c).rjust(w)
                         for c, w, lf in zip(cells, widths, left, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def format_stage_table(rows: Sequence[dict]) -> str:
    """The terminal view of a run: one line per stage, ratios against the first (baseline) row."""
    header, body = _cells(rows)
    return format_table(header, body, left=[c.left for c in _columns(rows)])


# ------------------------------------------------------------------------------------- reading


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"no metrics at {path}; run `lighten run RECIPE --output "
                          f"{Path(output_dir)}` first")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{number} is not valid JSON ({e.msg}); delete the line "
                              "or rerun the stage with --resume") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{number} is not a JSON object; expected one stage per line")
        rows.append(row)
    if not rows:
        raise ReportError(f"{path} is empty; the run stopped before the baseline was measured, "
                          "rerun it with --resume")
    return rows


def read_run_info(output_dir: str | os.PathLike) -> dict:
    """``run.json`` or an empty dict when it was never written (the report then says so)."""
    path = Path(output_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e.msg}); rerun the recipe to rewrite it") \
            from None
    if not isinstance(info, dict):
        raise ReportError(f"{path} is not a JSON object; rerun the recipe to rewrite it")
    return info


# --------------------------------------------------------------------------------------- plots


def _plot_png(rows: Sequence[dict], x_key: str, x_label: str, *, log_x: bool,
              y_key: str = "accuracy") -> bytes | None:
    """Accuracy (or ``y_key``: perplexity) against one cost, one labelled point per stage; None
    when no row has both."""
    percent = y_key == "accuracy"
    kept = [r for r in rows if r.get(x_key) and r.get(y_key) is not None]
    points = [(r[x_key], r[y_key] * (100 if percent else 1), str(r.get("stage", "?")))
              for r in kept]
    if not points:
        return None
    # a latency's spread ([low, high]: IQR across the timing rounds) as horizontal error bars
    spreads = [r.get(f"{x_key}_spread") for r in kept]
    xerr = None
    if all(_is_spread(sp) for sp in spreads):
        xerr = [[max(0.0, r[x_key] - sp[0]) for r, sp in zip(kept, spreads, strict=True)],
                [max(0.0, sp[1] - r[x_key]) for r, sp in zip(kept, spreads, strict=True)]]
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys, labels = zip(*points, strict=True)
    ax.plot(xs, ys, "-o", color="tab:blue")
    if xerr is not None:
        ax.errorbar(xs, ys, xerr=xerr, fmt="none", ecolor="tab:blue", elinewidth=1, capsize=3,
                    alpha=0.7, label="interquartile range across timing rounds")
        ax.legend(fontsize=7, loc="best")
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%)" if percent else f"{y_key} (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.12)  # room for the stage labels
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


STAGE_LABEL_CHARS = 28  # longer stage names are shortened on the size plot's axis


def _short(name: str, limit: int = STAGE_LABEL_CHARS) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def _bar_values(ax, values: Sequence[float], texts: Sequence[str]) -> None:
    """Horizontal bars, one per stage, each with its value written where it fits: inside a
    bar longer than half the axis, else just past its end (no ticks: the numbers are the
    labels)."""
    top = max(values) or 1.0
    ax.barh(range(len(values)), values, color="tab:blue", alpha=0.8, height=0.7)
    ax.set_xlim(0, top * 1.02)
    for i, (value, text) in enumerate(zip(values, texts, strict=True)):
        inside = value > top / 2
        ax.text(value - top * 0.02 if inside else value + top * 0.02, i, text, fontsize=8,
                va="center", ha="right" if inside else "left",
                color="white" if inside else "black")
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)


def size_figure(rows: Sequence[dict], y_key: str = "accuracy"):
    """Model size and accuracy (or ``y_key``: perplexity) per stage, as two bar panels that
    share one row per stage: stage names sit on their own rows, so no label overlaps another,
    however close the stages' sizes are. None when no row has both numbers."""
    kept = [r for r in rows if r.get("bytes") and r.get(y_key) is not None]
    if not kept:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 1.1 + 0.34 * len(kept)), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    base = kept[0]["bytes"]
    sizes = [r["bytes"] for r in kept]
    _bar_values(left, sizes, [human_bytes(b) if i == 0 else
                              f"{human_bytes(b)}, {_ratio(base, b, 'smaller', 'larger')}"
                              for i, b in enumerate(sizes)])
    percent = y_key == "accuracy"
    ys = [r[y_key] * (100 if percent else 1) for r in kept]
    _bar_values(right, ys, [f"{y:.2f}%" if percent else f"{y:.3f}" for y in ys])
    left.set_yticks(range(len(kept)), [_short(str(r.get("stage", "?"))) for r in kept],
                    fontsize=8)
    right.tick_params(axis="y", left=False, labelleft=False)
    left.invert_yaxis()  # the baseline on top, stages in run order
    left.set_title("model size", fontsize=9)
    right.set_title("accuracy (%)" if percent else f"{y_key} (lower is better)", fontsize=9)
    return fig


def _figure_png(fig) -> bytes:
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


PLOTS = (  # file stem, metrics key, axis label, log x (y: accuracy, or the stem's first word)
    ("accuracy_vs_bytes", "bytes", "model size (bytes, log scale)", True),
    ("accuracy_vs_latency_b64", "latency_ms_b64", "latency at batch 64 (ms)", False),
    ("perplexity_vs_bytes", "bytes", "model size (bytes, log scale)", True),  # LM rows only
)


# --------------------------------------------------------------------------------- the report


def _extra_keys(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in CORE_KEYS and not isinstance(v, dict | list):
                seen[k] = None
    return list(seen)


def _fmt_extra(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _sections(rows: Sequence[dict], info: dict, *, output_dir: Path | None = None,
              ) -> list[tuple[str, Any]]:
    """The report as (title, content) pairs; content is text, a table or a list of lines."""
    header, body = _cells(rows)
    sections: list[tuple[str, Any]] = [("Stages", ("table", header, body))]
    extras = _extra_keys(rows)
    if extras:
        sections.append(("Robustness, energy and other measurements",
                         ("table", ["stage", *extras],
                          [[str(r.get("stage", "?")), *(_fmt_extra(r.get(k)) for k in extras)]
                           for r in rows])))
    if output_dir is not None:
        sections += _step_sections(output_dir, rows)
        sections += _width_sections(output_dir, rows)
        sections += _layer_sections(output_dir, rows)
    sections += _dynamic_sections(rows)
    pre = info.get("preprocessing")
    if isinstance(pre, dict):  # what a deployed model must be fed, and what its outputs mean
        names = pre.get("class_names")
        sections.append(("Preprocessing", ("lines", [
            f"input transform: {pre.get('transform') or 'not recorded'}",
            f"classes: {', '.join(map(str, names)) if names else 'not recorded'}",
            "both are in every stage's artifact (meta.preprocessing) and ONNX file "
            "(metadata_props lighten.transform, lighten.class_names)"])))
    notes = info.get("notes") or []
    sections.append(("Notes", ("lines", [str(n) for n in notes] or ["(none)"])))
    prov = info.get("provenance") or {}
    if not info:
        sections.append(("Provenance", ("lines", ["run.json is missing: versions, machine and "
                                                  "recipe were not recorded"])))
        return sections
    for title, key in (("Versions", "versions"), ("Machine", "machine")):
        value = prov.get(key) or {}
        if isinstance(value, dict):
            sections.append((title, ("table", ["name", "value"],
                                     [[str(k), _fmt_extra(v)] for k, v in value.items()])))
        else:
            sections.append((title, ("lines", [str(value)])))
    recipe_lines = [f"recipe hash: {info.get('recipe_hash', '-')}",
                    f"seed: {prov.get('seed', info.get('seed', '-'))}"]
    sections.append(("Recipe", ("lines", recipe_lines)))
    if info.get("recipe") is not None:
        import yaml

        sections.append(("Recipe file", ("code", yaml.safe_dump(info["recipe"], sort_keys=False))))
    if isinstance(info.get("settings"), dict):  # every default filled in, only keys that apply
        import yaml

        sections.append(("Resolved settings",
                         ("code", yaml.safe_dump(info["settings"], sort_keys=False))))
    return sections


LAYER_COLUMNS = ("layer", "kind", "W bits", "A bits", "granularity", "scale min",
                 "scale median", "scale max", "SQNR dB", "in model dB", "compared with", "note")


def _db(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _layer_cells(r: dict) -> list[str]:
    bits = _fmt_extra(r.get("weight_bits"))
    used = r.get("weight_range_bits")
    if used is not None and used != r.get("weight_bits"):
        bits += f" ({used} used)"
    gran = str(r.get("granularity", "-"))
    if r.get("group_size"):
        gran += f" {r['group_size']}"
    return [str(r.get("name", "?")), str(r.get("kind", "?")), bits,
            _fmt_extra(r.get("activation_bits")), gran,
            *(_fmt_extra(r.get(k)) for k in ("scale_min", "scale_median", "scale_max")),
            _db(r.get("sqnr_db")), _db(r.get("sqnr_in_model_db")),
            str(r.get("compared_with", "-")), str(r.get("note") or "")]


def _stage_files(output_dir: Path, rows: Sequence[dict], suffix: str):
    """(stage, path) of each stage's ``stages/NN-<stage><suffix>`` file that exists."""
    for index, row in enumerate(rows):
        stage = str(row.get("stage", "?"))
        path = output_dir / "stages" / f"{index:02d}-{stage}{suffix}"
        if path.is_file():
            yield stage, path


def _layer_sections(output_dir: Path, rows: Sequence[dict]) -> list[tuple[str, Any]]:
    """One table per stage with quantized layers (``stages/NN-<stage>.layers.json``), worst
    SQNR first: the layer that hurts most is the first line."""
    out: list[tuple[str, Any]] = []
    for stage, path in _stage_files(output_dir, rows, ".layers.json"):
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            layers = sorted(table["rows"], key=lambda r: (r.get("sqnr_db") is None,
                                                          r.get("sqnr_db") or 0.0))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            out.append((f"Quantized layers: {stage}", ("lines", [
                f"{path} is unreadable ({type(e).__name__}); rerun the stage to rewrite it"])))
            continue
        title = (f"Quantized layers: {stage} (logits SQNR {_db(table.get('logits_sqnr_db'))} dB "
                 f"on {table.get('samples', '?')} test samples)")
        out.append((title, ("table", list(LAYER_COLUMNS), [_layer_cells(r) for r in layers])))
    if out:
        out.insert(0, ("Quantized layers", ("lines", [
            "each quantized layer against the same layer of the stage's input model, worst "
            "first; SQNR dB: the layer alone on the float model's inputs at that layer",
            "in model dB: the layer's output inside the quantized model (errors of earlier "
            "layers included); a folded BN and an absorbed ReLU are part of the float side"])))
    return out


STEP_ROWS_SHOWN = 40  # per stage; the .report.json file holds them all
# Per-layer row keys a step's Report shows; the other keys of a row are typed facts for programs
# (sparsity, weight_bits, shape_after ...), kept in the JSON, not shown.
ROW_COLUMNS = ("module", "action", "before", "after", "reason")


def layer_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The shown columns of a Report's per-layer rows (``reason`` only where a row has one)."""
    columns = [c for c in ROW_COLUMNS if c != "reason" or any(r.get("reason") for r in rows)]
    return columns, [[_row_cell(r.get(c)) for c in columns] for r in rows]


def _row_cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _step_sections(output_dir: Path, rows: Sequence[dict]) -> list[tuple[str, Any]]:
    """One compact table per stage of what its step did to each layer
    (``stages/NN-<stage>.report.json``, the step's :class:`lighten.verb.Report`)."""
    out: list[tuple[str, Any]] = []
    for stage, path in _stage_files(output_dir, rows, ".report.json"):
        try:
            layers = json.loads(path.read_text(encoding="utf-8"))["layers"]
            header, body = layer_table(layers)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            out.append((f"Layers: {stage}", ("lines", [
                f"{path} is unreadable ({type(e).__name__}); rerun the stage to rewrite it"])))
            continue
        if not body:
            continue
        out.append((f"Layers: {stage}", ("table", header, body[:STEP_ROWS_SHOWN])))
        if len(body) > STEP_ROWS_SHOWN:
            out.append((f"Layers: {stage} (continued)", ("lines", [
                f"{len(body) - STEP_ROWS_SHOWN} more rows in {path.name}"])))
    return out


def _out_in(kind: str, shape: Sequence[int]) -> tuple[int, int]:
    """(output, input) channels of a weight: a transposed conv's is (in, out/groups, k...)."""
    return (shape[1], shape[0]) if kind.startswith("ConvTranspose") else (shape[0], shape[1])


def width_rows(layers: Sequence[dict]) -> list[list[str]]:
    """Per resized or removed layer of a structural step's Report: out and in channels
    before -> after, and the share of its weights kept."""
    body = []
    for r in layers:
        before, after = r.get("shape_before"), r.get("shape_after")
        if not isinstance(before, list) or len(before) < 2 or r.get("action") not in (
                "resize", "remove"):
            continue  # norms and biases follow their producer's width
        kind = str(r.get("type", "?"))
        out_b, in_b = _out_in(kind, before)
        if isinstance(after, list) and len(after) == len(before):
            out_a, in_a = _out_in(kind, after)
            kept = math.prod(after) / max(1, math.prod(before))
            body.append([str(r.get("module", "?")), kind, f"{out_b} → {out_a}",
                         f"{in_b} → {in_a}", _pct(kept)])
        else:
            body.append([str(r.get("module", "?")), kind, f"{out_b} → removed",
                         f"{in_b} → removed", _pct(0.0)])
    return body


WIDTH_COLUMNS = ["layer", "type", "out channels", "in channels", "weights kept"]


def _width_sections(output_dir: Path, rows: Sequence[dict]) -> list[tuple[str, Any]]:
    """Per stage whose step changed layer widths (prune.channels, prune.neurons, prune.heads,
    prune.layers): every resized layer's channels before -> after."""
    out: list[tuple[str, Any]] = []
    for stage, path in _stage_files(output_dir, rows, ".report.json"):
        try:
            body = width_rows(json.loads(path.read_text(encoding="utf-8"))["layers"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError):
            continue  # the stage's Layers section says the file is unreadable
        if body:
            out.append((f"Widths: {stage}", ("table", list(WIDTH_COLUMNS), body)))
    return out


def _dynamic_sections(rows: Sequence[dict]) -> list[tuple[str, Any]]:
    """Per dynamic stage (a row with ``dynamic``): dynamic.early_exit's exits (share of test
    samples answered there, their accuracy, the MACs spent), dynamic.gating's blocks,
    dynamic.slimmable's widths (each width's own accuracy, MACs, params, latency),
    dynamic.any_precision's precisions (each one's accuracy, agreement, weight bytes)."""
    out: list[tuple[str, Any]] = []
    for r in rows:
        dyn = r.get("dynamic")
        if not isinstance(dyn, dict):
            continue
        if isinstance(dyn.get("exits"), list):
            body = [[str(e.get("name")), _pct(e.get("share")), _pct(e.get("accuracy")),
                     human_count(e.get("macs"))] for e in dyn["exits"]]
            out.append((f"Exits: {r.get('stage')}", ("table",
                        ["exit", "share of test samples", "accuracy there", "MACs"], body)))
        if isinstance(dyn.get("blocks"), list):  # dynamic.gating
            body = [[str(b.get("name")), _pct(b.get("share")), human_count(b.get("macs"))]
                    for b in dyn["blocks"]]
            out.append((f"Gated blocks: {r.get('stage')}", ("table",
                        ["block", "share of test samples that run it", "MACs"], body)))
        if dyn.get("kind") == "slimmable" and isinstance(dyn.get("widths"), list):
            body = [[f"{w.get('width'):g}" + (" (deployed)" if w.get("width") == dyn.get("width")
                                              else ""), _pct(w.get("accuracy")),
                     human_count(w.get("macs")), human_count(w.get("params")),
                     _ms(w.get("latency_ms_b1"))]
                    for w in dyn["widths"]]
            out.append((f"Slimmable widths: {r.get('stage')}", ("table",
                        ["width", "accuracy", "MACs", "params", "latency ms (b1)"], body)))
        if isinstance(dyn.get("precisions"), list):  # dynamic.any_precision
            body = [[f"{p.get('bits')}-bit" + (" (active)" if p.get("bits") == dyn.get(
                        "active_bits") else ""), _pct(p.get("accuracy")),
                     _pct(p.get("agreement_with_widest")), human_bytes(p.get("weight_bytes"))]
                    for p in dyn["precisions"]]
            out.append((f"Precisions: {r.get('stage')}", ("table",
                        ["weights", "accuracy", "agreement with the widest", "weight bytes"],
                        body)))
    return out


def _markdown(title: str, sections, plots: dict[str, str]) -> str:
    out = [f"# {title}", ""]
    for stem, _png in plots.items():
        out += [f"![{stem}](plots/{stem}.png)", ""]
    for name, (kind, *content) in sections:
        out += [f"## {name}", ""]
        if kind == "table":
            header, body = content
            esc = [[c.replace("|", "\\|") for c in row] for row in [header, *body]]
            out.append("| " + " | ".join(esc[0]) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(row) + " |" for row in esc[1:]]
        elif kind == "code":
            out += ["```yaml", content[0].rstrip(), "```"]
        else:
            out += [f"- {line}" for line in content[0]]
        out.append("")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}"
        "table{border-collapse:collapse;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}pre{background:#f5f5f5;padding:1em}")


def _html(title: str, sections, plots: dict[str, str]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    for stem, b64 in plots.items():
        out.append(f"<img alt='{e(stem)}' src='data:image/png;base64,{b64}'>")
    for name, (kind, *content) in sections:
        out.append(f"<h2>{e(name)}</h2>")
        if kind == "table":
            header, body = content
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body]
            out.append("</table>")
        elif kind == "code":
            out.append(f"<pre>{e(content[0])}</pre>")
        else:
            out.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in content[0]) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write OUTPUT/report.md (+ plots/*.png) and a self-contained OUTPUT/report.html."""
    output_dir = Path(output_dir)
    rows = read_metrics(output_dir)
    info = read_run_info(output_dir)
    recipe = info.get("recipe") if isinstance(info.get("recipe"), dict) else {}
    title = f"lighten report: {recipe.get('name') or output_dir.name}"

    plots: dict[str, str] = {}
    for stem, key, label, log_x in PLOTS:
        if key == "bytes":  # the size plot: one bar row per stage, labels never collide
            fig = size_figure(rows, y_key=stem.split("_vs_")[0])
            png = None if fig is None else _figure_png(fig)
        else:
            png = _plot_png(rows, key, label, log_x=log_x, y_key=stem.split("_vs_")[0])
        if png is not None:
            atomic_write_bytes(output_dir / "plots" / f"{stem}.png", png)
            plots[stem] = base64.b64encode(png).decode("ascii")

    sections = _sections(rows, info, output_dir=output_dir)
    md_path, html_path = output_dir / "report.md", output_dir / "report.html"
    atomic_write_bytes(md_path, _markdown(title, sections, plots).encode("utf-8"))
    atomic_write_bytes(html_path, _html(title, sections, plots).encode("utf-8"))
    return md_path, html_path
