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
    assert "CVE-2025-32434" in torch_line and "torch>=2.6.0" in torch_line
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
