"""Dependency audit (`make audit`): pip-audit on what the install pins, and the floors in
pyproject.toml checked against the releases that fixed each known CVE.

Two parts, because the first needs a network the second does not:

- ``pip-audit`` (installed on demand into the venv) audits ``pip freeze`` of this environment
  -- exactly what `make install` resolved -- against its vulnerability service. Where the
  service cannot be reached (no route to osv.dev, or PyPI answering 404 for per-release
  metadata), the result says "not audited" and why; it never reads as clean.
- :data:`KNOWN_FIXES` names, per core dependency, the advisories that matter to a tool that
  reads untrusted model files, and the release that fixed each. ``pyproject.toml``'s lower
  bound must be at or above every fix, so no resolver can pick a vulnerable release; this part
  runs offline and in `make test` (tests/test_audit.py).

    python scripts/audit.py            # both; writes benchmarks/results/audit.json
    python scripts/audit.py --floors   # only the offline check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "audit.json"

# package -> [(advisory, first fixed release, what it is)]
KNOWN_FIXES: dict[str, list[tuple[str, str, str]]] = {
    "torch": [("CVE-2025-32434", "2.6.0",
               "torch.load(weights_only=True) still ran code from a crafted file")],
    "onnx": [("CVE-2024-27318", "1.16.0", "external-data path traversal"),
             ("CVE-2024-27319", "1.16.0", "out-of-bounds read"),
             ("CVE-2024-5187", "1.17.0", "file overwrite in download_model_with_test_data"),
             ("CVE-2026-27489", "1.21.0", "path traversal through a symlinked external-data file"),
             ("CVE-2026-34445", "1.21.0", "ExternalDataInfo attribute injection (memory DoS)")],
    "tqdm": [("CVE-2024-34062", "4.66.3", "eval of CLI arguments")],
    "scikit-learn": [("CVE-2024-5206", "1.5.0", "TfidfVectorizer kept discarded tokens")],
}


def floor(requirement: Requirement) -> Version | None:
    """The lowest release ``requirement`` allows (its ``>=``/``==``/``~=`` bound), or None."""
    bounds = [Version(s.version) for s in requirement.specifier
              if s.operator in (">=", "==", "~=", "===")]
    return max(bounds) if bounds else None


def check_floors(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """One line per dependency whose lower bound still admits a release with a known CVE."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    requirements = {Requirement(d).name.lower(): Requirement(d) for d in deps}
    problems = []
    for name, fixes in KNOWN_FIXES.items():
        if name not in requirements:
            continue
        needed = max(Version(fixed) for _, fixed, _ in fixes)
        low = floor(requirements[name])
        if low is None or low < needed:
            ids = ", ".join(cve for cve, fixed, _ in fixes if low is None or low < Version(fixed))
            problems.append(f"{name}: the floor {low or 'none'} admits releases before {needed} "
                            f"({ids}); require {name}>={needed}")
    return problems


def pip_audit() -> dict:
    """pip-audit of this environment's pins: {status, vulnerabilities, packages, detail}."""
    python = sys.executable
    if subprocess.run([python, "-m", "pip_audit", "--version"], capture_output=True).returncode:
        subprocess.run([python, "-m", "pip", "install", "-q", "pip-audit"], check=False)
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    pins = [line for line in freeze.splitlines() if "==" in line and not line.startswith("-e")]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
    proc = subprocess.run([python, "-m", "pip_audit", "-r", f.name, "--no-deps", "--disable-pip",
                           "--progress-spinner", "off", "-f", "json"],
                          capture_output=True, text=True, timeout=900)
    Path(f.name).unlink(missing_ok=True)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "not audited", "packages": len(pins), "vulnerabilities": None,
                "detail": f"pip-audit failed: {last[:300]}"}
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    found = [{"package": d["name"], "version": d["version"], "id": v["id"],
              "fixed": v.get("fix_versions", [])} for d in deps for v in d.get("vulns", [])]
    if skipped and len(skipped) == len(deps):
        return {"status": "not audited", "packages": len(pins), "vulnerabilities": None,
                "detail": f"the vulnerability service answered for none of the {len(deps)} pins "
                          f"({skipped[0]['skip_reason'][:120]})"}
    return {"status": "clean" if not found else "vulnerable", "packages": len(pins),
            "audited": len(deps) - len(skipped), "vulnerabilities": found,
            "detail": f"{len(skipped)} pins could not be looked up" if skipped else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floors", action="store_true", help="only the offline floor check")
    args = parser.parse_args()
    problems = check_floors()
    for line in problems:
        print(f"floor: {line}")
    print(f"floors: {sum(len(f) for f in KNOWN_FIXES.values())} advisories in "
          f"{len(KNOWN_FIXES)} packages, {len(problems)} floors too low")
    if args.floors:
        return int(bool(problems))
    audit = pip_audit()
    print(f"pip-audit: {audit['status']} ({audit['packages']} pins) {audit['detail']}")
    for v in audit.get("vulnerabilities") or []:
        print(f"  {v['package']} {v['version']}: {v['id']} fixed in {', '.join(v['fixed'])}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "floor_problems": problems,
                                   "advisories": sum(len(f) for f in KNOWN_FIXES.values()),
                                   **audit}, indent=1))
    return int(bool(problems) or audit["status"] == "vulnerable")


if __name__ == "__main__":
    sys.exit(main())
