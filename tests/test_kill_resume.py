"""kill -9 at a dozen random moments of a run: the output folder only ever holds complete
files, and ``--resume`` ends with the metrics and artifacts of a run never interrupted.

The 50+ kill version is ``python scripts/kill_anywhere.py`` (``make reliability``).
"""

from __future__ import annotations

import pytest

from tests.kill_harness import kill_anywhere


@pytest.mark.slow
def test_a_dozen_kills_then_resume_equal_an_uninterrupted_run(tmp_path):
    report, mismatches = kill_anywhere(tmp_path, kills=12, seed=0)
    assert report.kills >= 12
    assert report.problems == []  # every file complete after every kill
    assert mismatches == []  # same rows (timing aside), tensors, manifests; no temp files; finished
    # the kills reached the work itself, not only start-up
    assert sum(not p.startswith("(starting up)") for p in report.phases) >= 6
