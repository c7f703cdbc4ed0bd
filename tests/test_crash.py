"""Scenario: studies stream in from parallel senders while the node is killed with SIGKILL and
restarted, again and again; nothing acknowledged is lost, nothing is done twice.

The short CI run (5 kills); bench/crash_soak.py runs the full one (>= 20 kills) with the same
checks and prints the same figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from crash_soak import run_soak  # noqa: E402


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path, capsys):
    report = run_soak(tmp_path, kills=5, studies=4, slices=12, size=128, senders=3, seed=7,
                      min_delay=0.8, max_delay=3.0, drain_timeout=300)
    with capsys.disabled():
        print("\n[crash] " + "\n[crash] ".join(report.lines()))
    assert report.problems == []
    assert report.kills == 5
    assert report.instances_verified == report.instances_sent == 48
    assert report.jobs_done == report.jobs >= 4
    assert report.result_series_duplicates == 0
    assert report.temp_files == 0
