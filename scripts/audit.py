"""Dependency audit (`make audit`): the installed pins checked for known vulnerabilities, and
the floors in pyproject.toml checked against the releases that fixed each known CVE.

Two parts, because the first needs a network the second does not:

- ``pip-audit`` (installed on demand into the venv) audits ``pip freeze`` of this environment
  -- exactly what `make install` resolved -- against its vulnerability service. The pins it
  cannot look up (no route to osv.dev, or PyPI answering 404 for per-release metadata) fall
  back to PyPI's project JSON (``/pypi/<name>/json``), whose ``vulnerabilities`` list is that
  of the project's *latest* release: a pin equal to the latest release is audited by it; an
  older pin cannot be audited that way and is counted as not audited. The verdict is "clean"
  only when every pin was audited and none has a known vulnerability.
- :data:`KNOWN_FIXES` names, per core dependency, the advisories that matter to a tool that
  reads untrusted model files, and the release that fixed each. ``pyproject.toml``'s lower
  bound must be at or above every fix, so no resolver can pick a vulnerable release; this part
  runs offline and in `make test` (tests/test_audit.py).

    python scripts/audit.py                   # both; writes benchmarks/results/audit.json
    python scripts/audit.py --scope declared  # only the pins pyproject.toml names
    python scripts/audit.py --floors          # only the offline check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "audit.json"

# package -> [(advisory, first fixed release, what it is)]
KNOWN_FIXES: dict[str, list[tuple[str, str, str]]] = {
    "torch": [("CVE-2025-32434", "2.6.0",
               "torch.load(weights_only=True) still ran code from a crafted file"),
              ("CVE-2026-24747", "2.10.0",
               "memory corruption in the weights_only unpickler (code execution)")],
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


def installed_pins(scope: str = "all", pyproject: Path = ROOT / "pyproject.toml"
                   ) -> dict[str, str]:
    """``{name: version}`` of ``pip freeze`` (editable installs aside); ``scope="declared"``
    keeps the packages pyproject.toml names (dependencies and extras)."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    pins = dict(line.split("==", 1) for line in freeze.splitlines()
                if "==" in line and not line.startswith("-e"))
    if scope == "declared":
        project = tomllib.loads(pyproject.read_text())["project"]
        declared = [*project["dependencies"],
                    *(r for extra in project.get("optional-dependencies", {}).values()
                      for r in extra)]
        names = {canonicalize_name(Requirement(r).name) for r in declared}
        pins = {n: v for n, v in pins.items() if canonicalize_name(n) in names}
    return pins


def pip_audit(pins: dict[str, str]) -> dict:
    """pip-audit of ``pins``: {audited: [names], vulnerabilities: [...], reason: why the others
    were not audited (None where all were)}."""
    python = sys.executable
    if subprocess.run([python, "-m", "pip_audit", "--version"], capture_output=True).returncode:
        subprocess.run([python, "-m", "pip", "install", "-q", "pip-audit"], check=False)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{n}=={v}\n" for n, v in pins.items()))
    proc = subprocess.run([python, "-m", "pip_audit", "-r", f.name, "--no-deps", "--disable-pip",
                           "--progress-spinner", "off", "-f", "json"],
                          capture_output=True, text=True, timeout=900)
    Path(f.name).unlink(missing_ok=True)
    try:
        deps = json.loads(proc.stdout).get("dependencies", [])
    except json.JSONDecodeError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"audited": [], "vulnerabilities": [], "reason": f"pip-audit failed: {last[:300]}"}
    skipped = [d for d in deps if d.get("skip_reason")]
    return {"audited": [d["name"] for d in deps if not d.get("skip_reason")],
            "vulnerabilities": [{"package": d["name"], "version": d["version"], "id": v["id"],
                                 "aliases": v.get("aliases", []),
                                 "fixed": v.get("fix_versions", [])}
                                for d in deps for v in d.get("vulns", [])],
            "reason": (f"pip-audit could not look up {len(skipped)} of {len(deps)} pins "
                       f"({skipped[0]['skip_reason'][:120]})") if skipped else None}


def pypi_project(name: str) -> dict | None:
    """PyPI's project JSON for ``name`` (``https://pypi.org/pypi/<name>/json``), None where it
    cannot be fetched: the fallback's one network call (tests pass canned answers instead)."""
    url = f"https://pypi.org/pypi/{urllib.parse.quote(name)}/json"
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": "lighten-audit"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _same_release(pinned: str, latest: str) -> bool:
    """Whether a pin is the latest release (a local build such as ``2.13.0+cpu`` counts as its
    public version)."""
    try:
        return Version(pinned).public == Version(latest).public
    except InvalidVersion:
        return pinned == latest


def latest_release_audit(pins: dict[str, str],
                         fetch: Callable[[str], dict | None] = pypi_project) -> dict:
    """Audit ``pins`` by PyPI's project JSON, whose ``vulnerabilities`` are those of the
    project's latest release: only a pin equal to that release is audited; an older pin is
    listed in ``behind`` and one whose JSON could not be fetched in ``not_fetched``."""
    audited, behind, not_fetched, found = [], [], [], []
    for name, version in pins.items():
        project = fetch(name)
        latest = ((project or {}).get("info") or {}).get("version")
        if not latest:
            not_fetched.append(name)
        elif not _same_release(version, latest):
            behind.append({"package": name, "version": version, "latest": latest})
        else:
            audited.append(name)
            found += [{"package": name, "version": version, "id": v.get("id"),
                       "aliases": v.get("aliases") or [], "fixed": v.get("fixed_in") or []}
                      for v in project.get("vulnerabilities") or [] if not v.get("withdrawn")]
    return {"audited": audited, "behind": behind, "not_fetched": not_fetched,
            "vulnerabilities": found}


def verdict(packages: int, by_pip_audit: dict, by_latest: dict | None) -> dict:
    """One verdict over both ways of auditing: "vulnerable" if either found anything, "clean"
    only if every one of ``packages`` pins was audited, else "partly audited" / "not
    audited" with what was not audited and why."""
    latest = by_latest or {"audited": [], "behind": [], "not_fetched": [], "vulnerabilities": []}
    found = by_pip_audit["vulnerabilities"] + latest["vulnerabilities"]
    audited = len(by_pip_audit["audited"]) + len(latest["audited"])
    behind, not_fetched = len(latest["behind"]), len(latest["not_fetched"])
    missing = packages - audited
    status = ("vulnerable" if found else "clean" if missing == 0
              else "not audited" if audited == 0 else "partly audited")
    parts = [f"{audited} of {packages} pins audited "
             f"({len(by_pip_audit['audited'])} by pip-audit, {len(latest['audited'])} at their "
             f"latest release by PyPI's project JSON): {len(found)} known vulnerabilities"]
    if missing:
        parts.append(f"not audited: {missing} pins"
                     + (f", {behind} behind their latest release" if behind else "")
                     + (f", {not_fetched} whose PyPI JSON could not be fetched"
                        if not_fetched else ""))
    if by_pip_audit["reason"]:
        parts.append(by_pip_audit["reason"])
    return {"status": status, "packages": packages, "audited": audited,
            "audited_pins": sorted(by_pip_audit["audited"] + latest["audited"]),
            "vulnerabilities": found, "not_audited": {"behind_latest": latest["behind"],
                                                      "not_fetched": latest["not_fetched"]},
            "detail": "; ".join(parts)}


def audit_pins(pins: dict[str, str],
               fetch: Callable[[str], dict | None] = pypi_project) -> dict:
    """pip-audit first; the pins it could not look up by PyPI's project JSON."""
    by_pip_audit = pip_audit(pins)
    done = {canonicalize_name(n) for n in by_pip_audit["audited"]}
    rest = {n: v for n, v in pins.items() if canonicalize_name(n) not in done}
    return verdict(len(pins), by_pip_audit, latest_release_audit(rest, fetch) if rest else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floors", action="store_true", help="only the offline floor check")
    parser.add_argument("--scope", choices=["all", "declared"], default="all",
                        help="every installed pin, or only those pyproject.toml names")
    args = parser.parse_args()
    problems = check_floors()
    for line in problems:
        print(f"floor: {line}")
    print(f"floors: {sum(len(f) for f in KNOWN_FIXES.values())} advisories in "
          f"{len(KNOWN_FIXES)} packages, {len(problems)} floors too low")
    if args.floors:
        return int(bool(problems))
    audit = audit_pins(installed_pins(args.scope))
    print(f"audit ({args.scope} pins): {audit['status']}: {audit['detail']}")
    for v in audit["vulnerabilities"]:
        print(f"  {v['package']} {v['version']}: {v['id']} fixed in {', '.join(v['fixed'])}")
    for b in audit["not_audited"]["behind_latest"]:
        print(f"  not audited: {b['package']} {b['version']} (latest {b['latest']})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "scope": args.scope,
                                   "floor_problems": problems,
                                   "advisories": sum(len(f) for f in KNOWN_FIXES.values()),
                                   **audit}, indent=1))
    return int(bool(problems) or audit["status"] == "vulnerable")


if __name__ == "__main__":
    sys.exit(main())
