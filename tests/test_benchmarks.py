"""The benchmarks run end to end on a tiny input (no timing is asserted: timings are the user's)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_overhead_benchmark_runs():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--rows", "200", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert any(line.startswith("ratio b/a") for line in done.stdout.splitlines()), done.stdout
