#!/usr/bin/env bash
# Set up .venv with the test tools, then lint and run the whole test suite.
#   bash scripts/test.sh [--fast | --benchmarks] [pytest arguments]
# --fast: the inner loop's lane (at most 3 minutes): the tests not marked `slow` (pytest says
# how many it deselected), without the SLURM start. It still runs `daskdp run` end to end on the
# real engine against plain vLLM (tests/test_pipeline.py).
# --benchmarks: only the tests that run each benchmark script on a tiny input (marked
# `benchmarks`), which the other lanes leave out: a change to benchmarks/ runs them.
# Every lane runs its modules in DASKDP_TEST_PROCESSES pytest processes (default 2;
# pytest-xdist, one module per process at a time): much of a test is waiting on a cluster, a
# deadline or a process, which the other process's test fills. Each starts its own warm cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=
benchmarks=
if [ "${1:-}" = "--fast" ]; then
    fast=1
    shift
elif [ "${1:-}" = "--benchmarks" ]; then
    benchmarks=1
    shift
fi
bash scripts/setup.sh --test
if [ -n "$fast$benchmarks" ]; then
    export DASKDP_SLURM_UNAVAILABLE="${DASKDP_SLURM_UNAVAILABLE:-not started by this lane of scripts/test.sh}"
# A one-node SLURM for tests/test_jobqueue.py. Where it cannot start (no root, no packages),
# the run goes on and those tests are skipped with the reason.
elif ! slurm_error=$(bash scripts/slurm.sh 2>&1 >/dev/null); then
    DASKDP_SLURM_UNAVAILABLE=$(printf '%s\n' "$slurm_error" | tail -n1)
    export DASKDP_SLURM_UNAVAILABLE="${DASKDP_SLURM_UNAVAILABLE:-scripts/slurm.sh failed}"
    echo "SLURM unavailable, its tests will be skipped: $DASKDP_SLURM_UNAVAILABLE" >&2
fi
.venv/bin/ruff check daskdp tests benchmarks tools
.venv/bin/ruff format --check daskdp tests benchmarks tools
# Modules in the order tests/conftest.py gives them (the longest first), not by test count.
pytest=(.venv/bin/python -m pytest -n "${DASKDP_TEST_PROCESSES:-2}" --dist loadfile --no-loadscope-reorder)
if [ -n "$fast" ]; then
    echo "fast lane: the tests marked slow, slurm or benchmarks are deselected" >&2
    "${pytest[@]}" -m "not slow and not slurm and not benchmarks" "$@"
elif [ -n "$benchmarks" ]; then
    "${pytest[@]}" -m benchmarks "$@"
else
    "${pytest[@]}" -m "not benchmarks" "$@"
fi
