"""Provenance facts and the atomic writers the runner, report and artifact share."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from lighten import provenance as prov
from lighten.errors import RecipeError
from lighten.step import StrictModel


def test_versions_name_every_library_and_match_the_imported_ones():
    found = prov.versions()
    assert set(found) == {"lighten", "torch", "onnx", "onnxruntime", "numpy", "python"}
    assert found["numpy"] == np.__version__
    assert found["torch"] == torch.__version__
    assert found["python"] == ".".join(map(str, sys.version_info[:3]))
    assert all(isinstance(v, str) and v for v in found.values())


def test_versions_do_not_import_onnxruntime():
    code = ("import sys, lighten.provenance as p; p.versions(); "
            "print('onnxruntime' in sys.modules, 'onnx' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.split() == ["False", "False"]


def test_missing_distribution_reads_not_installed(monkeypatch):
    monkeypatch.setattr(prov, "_DISTRIBUTIONS", ("torch", "surely-not-a-real-dist-h3"))
    assert prov.versions()["surely-not-a-real-dist-h3"] == "not installed"


def test_machine_reports_cores_threads_and_ram():
    info = prov.machine()
    assert info["logical_cores"] >= info["available_cores"] >= 1
    assert info["torch_threads"] == torch.get_num_threads()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["ram_gb"] is None or info["ram_gb"] > 0
    assert info["cpu_quota"] is None or info["cpu_quota"] > 0
    json.dumps(info)  # recorded in JSON files


class _Cfg(StrictModel):
    lr: float
    steps: list[str]


def test_recipe_hash_is_canonical():
    a = {"name": "x", "steps": [{"prune": 0.5}], "seed": 0}
    b = {"seed": 0, "steps": [{"prune": 0.5}], "name": "x"}
    h = prov.recipe_hash(a)
    assert h == prov.recipe_hash(b) and len(h) == 16 and int(h, 16) >= 0
    assert prov.recipe_hash({**a, "seed": 1}) != h
    assert prov.recipe_hash(_Cfg(lr=0.1, steps=["a"])) == prov.recipe_hash(
        {"lr": 0.1, "steps": ["a"]})
    assert prov.recipe_hash({"path": Path("a/b")}) == prov.recipe_hash({"path": "a/b"})
    with pytest.raises(RecipeError, match="cannot hash a recipe value of type object"):
        prov.recipe_hash({"bad": object()})


def test_provenance_combines_everything_with_a_utc_time():
    before = datetime.now(UTC).replace(microsecond=0)
    record = prov.provenance({"name": "r"}, 7)
    stamp = datetime.fromisoformat(record["timestamp_utc"])
    assert stamp.utcoffset().total_seconds() == 0 and stamp >= before
    assert record["recipe_hash"] == prov.recipe_hash({"name": "r"}) and record["seed"] == 7
    assert set(record["versions"]) >= {"torch", "lighten"} and "cpu" in record["machine"]
    assert prov.provenance(None, 0)["recipe_hash"] is None
    json.dumps(record)


def test_atomic_write_creates_overwrites_and_counts_bytes(tmp_path):
    path = tmp_path / "sub" / "run.json"
    assert prov.atomic_write_text(path, "héllo") == len("héllo".encode())
    assert path.read_text(encoding="utf-8") == "héllo"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert prov.atomic_write_bytes(path, b"\x00\x01") == 2
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["run.json"]


def test_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    prov.atomic_write_text(path, "old")

    def fail(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(prov.os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        prov.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.md"]
