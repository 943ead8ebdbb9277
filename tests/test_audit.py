"""The dependency floors exclude every release with a known CVE (scripts/audit.py)."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "audit.py")
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)


def test_pyproject_floors_are_past_every_known_fix():
    assert audit.check_floors() == []


def test_a_floor_below_a_fix_is_reported(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(textwrap.dedent("""
        [project]
        name = "x"
        dependencies = ["torch>=2.5,<2.16", "onnx>=1.16", "tqdm", "numpy>=1.26"]
    """))
    problems = audit.check_floors(pyproject)
    assert len(problems) == 3
    torch_line, = [p for p in problems if p.startswith("torch")]
    assert "CVE-2025-32434" in torch_line and "CVE-2026-24747" in torch_line
    assert "torch>=2.10.0" in torch_line  # the highest fix the floor admits releases before
    onnx_line, = [p for p in problems if p.startswith("onnx")]
    assert "CVE-2026-27489" in onnx_line and "CVE-2024-27318" not in onnx_line  # 1.16 fixed it
    assert any(p.startswith("tqdm: the floor none") for p in problems)


def test_the_installed_releases_are_past_every_fix():
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    for name, fixes in audit.KNOWN_FIXES.items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            continue
        needed = max(Version(fixed) for _, fixed, _ in fixes)
        assert installed.release >= needed.release, f"{name} {installed} < {needed}"


def _project(latest: str, *vulns: dict) -> dict:
    """PyPI's answer to GET /pypi/<name>/json, reduced to the keys the audit reads."""
    return {"info": {"version": latest}, "vulnerabilities": list(vulns)}


ADVISORY = {"id": "GHSA-aaaa-bbbb-cccc", "aliases": ["CVE-2026-0001"], "fixed_in": ["2.1.1"],
            "withdrawn": None, "summary": "", "details": "x", "link": "https://osv.dev/x"}
PYPI = {"fresh": _project("1.4.0"),
        "flawed": _project("2.1.0", ADVISORY, {**ADVISORY, "id": "PYSEC-0", "withdrawn": "2026"}),
        "stale": _project("3.0.0", ADVISORY),  # the list is 3.0.0's; says nothing of 2.9
        "torch": _project("2.13.0")}


def test_only_pins_at_their_latest_release_are_audited_by_the_project_json():
    pins = {"fresh": "1.4.0", "flawed": "2.1.0", "stale": "2.9.0", "torch": "2.13.0+cpu",
            "gone": "0.1"}
    got = audit.latest_release_audit(pins, fetch=PYPI.get)
    assert got["audited"] == ["fresh", "flawed", "torch"]  # a local +cpu build is 2.13.0
    assert got["behind"] == [{"package": "stale", "version": "2.9.0", "latest": "3.0.0"}]
    assert got["not_fetched"] == ["gone"]
    assert got["vulnerabilities"] == [{"package": "flawed", "version": "2.1.0",
                                       "id": "GHSA-aaaa-bbbb-cccc", "aliases": ["CVE-2026-0001"],
                                       "fixed": ["2.1.1"]}]  # the withdrawn one is not listed


def test_the_verdict_is_clean_only_when_every_pin_was_audited():
    failed = {"audited": [], "vulnerabilities": [], "reason": "pip-audit could not look up 3 "
              "of 3 pins (Dependency not found on PyPI)"}
    clean = audit.verdict(2, failed, audit.latest_release_audit(
        {"fresh": "1.4.0", "torch": "2.13.0"}, fetch=PYPI.get))
    assert clean["status"] == "clean" and clean["audited"] == 2
    partly = audit.verdict(3, failed, audit.latest_release_audit(
        {"fresh": "1.4.0", "torch": "2.13.0", "stale": "2.9.0"}, fetch=PYPI.get))
    assert partly["status"] == "partly audited"
    assert "not audited: 1 pins, 1 behind their latest release" in partly["detail"]
    none = audit.verdict(1, failed, audit.latest_release_audit({"stale": "2.9.0"},
                                                               fetch=PYPI.get))
    assert none["status"] == "not audited" and "clean" not in none["detail"]
    bad = audit.verdict(2, failed, audit.latest_release_audit(
        {"flawed": "2.1.0", "stale": "2.9.0"}, fetch=PYPI.get))
    assert bad["status"] == "vulnerable" and "1 known vulnerabilities" in bad["detail"]
    assert "not audited: 1 pins" in bad["detail"]
    by_pip_audit = {"audited": ["numpy"], "vulnerabilities": [], "reason": None}
    assert audit.verdict(1, by_pip_audit, None)["status"] == "clean"
