"""SIGKILL ``lighten run`` at 50+ random moments and check that nothing is lost.

    python scripts/kill_anywhere.py [--kills 60] [--seed 0] [--json results.json]

After every kill each file of the output folder must be complete, and every killed run, resumed
until it finishes, must give metrics.jsonl rows (timing aside) and stage artifacts identical to
an uninterrupted run's. Prints one summary line; exit status 1 on any problem. The harness is
``tests/kill_harness.py`` (``make test`` runs a dozen kills of it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kill_harness import kill_anywhere  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lighten-kill-") as tmp:
        report, mismatches = kill_anywhere(Path(tmp), kills=args.kills, seed=args.seed)
    phases = Counter(p.split(":")[0] for p in report.phases)
    result = {"kills": report.kills, "resumes": report.resumes,
              "incomplete_files": len(report.problems), "mismatched_runs": len(mismatches),
              "phases": dict(phases), "problems": report.problems + mismatches,
              "seconds": round(time.monotonic() - start, 1)}
    print(f"kill -9 anywhere: {result['kills']} kills, {result['resumes']} resumes, "
          f"{result['incomplete_files']} incomplete files, {result['mismatched_runs']} runs "
          f"differing from the uninterrupted one ({result['seconds']} s)")
    for problem in result["problems"]:
        print("  " + problem)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
