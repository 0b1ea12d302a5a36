"""The load benchmark runs end to end on tiny inputs (no memory or time is asserted: those are the user's)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.benchmarks


def test_load_benchmark_runs():
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "load.py"),
            "--rows",
            "200",
            "500",
            "--workers",
            "1",
        ],  # one engine to load
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("ratio") for line in lines), done.stdout
    assert sum("every id once" in line for line in lines) == 2, done.stdout
