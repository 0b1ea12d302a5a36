"""The benchmarks run end to end on a tiny input (no timing is asserted: timings are the user's)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.benchmarks


def benchmark(script: str, *args: str, timeout: float = 900) -> list[str]:
    """Run ``benchmarks/SCRIPT ARGS`` in a fresh process; its stdout lines. It must exit 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.parametrize("workload", ["plain", "samples"])
def test_overhead_benchmark_runs(workload):
    lines = benchmark("overhead.py", "--rows", "200", "--repeats", "1", "--workload", workload)
    assert any(line.startswith("ratio b/a") for line in lines), lines
    if workload == "plain":
        assert any("texts: identical" in line for line in lines), lines


def test_logprobs_memory_benchmark_runs():
    lines = benchmark("logprobs_memory.py", "--rows", "200")
    assert any(line.startswith("target     client peak b/a") for line in lines), lines
    (files,) = [line for line in lines if line.startswith("ratio b/a  chunk files")]
    assert float(files.split()[-1]) > 2, lines  # the logprobs are in the files


def test_launcher_benchmark_runs():
    # The skewed workload runs every side: the launcher, daskdp balanced and dynamic.
    lines = benchmark("launcher.py", "--workload", "skewed", "--rows", "150", "--repeats", "1")
    assert {line[:9] for line in lines if line.startswith("ratio ")} == {"ratio b/a", "ratio c/a"}, lines
    assert any(line.startswith("makespan/ideal (a) launcher") for line in lines), lines
    assert sum(line.startswith("target") for line in lines) == 2, lines
    assert not any("rows differ" in line for line in lines), lines  # greedy: the same texts


def test_ray_data_benchmark_runs():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install -e '.[bench]')")
    lines = benchmark("ray_data.py", "--rows", "200", "--repeats", "1")
    reason = next((line for line in lines if line.startswith("ray_data:")), None)
    if reason:  # Ray Data LLM cannot be imported or run here: the script says why
        pytest.skip(reason)
    assert any(line.startswith("ratio b/a") for line in lines), lines


def test_prefix_benchmark_runs():
    lines = benchmark("prefix.py", "--rows", "300", "--prefixes", "4", "--repeats", "1")
    assert any(line.startswith("ratio b/a") for line in lines), lines
    assert any(line.startswith("hit rate") for line in lines), lines


def test_embed_benchmark_runs():
    lines = benchmark("embed.py", "--rows", "200", "--repeats", "1")
    assert {line[:9] for line in lines if line.startswith("ratio ")} == {"ratio b/a", "ratio c/a"}, lines
    assert sum("lowest cosine to the baseline's: 1.0000" in line for line in lines) == 2, lines


def test_run_batch_benchmark_runs():
    lines = benchmark("run_batch.py", "--rows", "100", "--repeats", "1")
    assert sum(line.startswith("ratio ") for line in lines) == 2, lines
    assert any("answers of a and b: identical" in line for line in lines), lines
