#!/usr/bin/env bash
# Set up .venv with the test tools, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# A one-node SLURM for tests/test_jobqueue.py. Where it cannot start (no root, no packages),
# the run goes on and those tests are skipped with the reason.
if ! slurm_error=$(bash scripts/slurm.sh 2>&1 >/dev/null); then
    DASKDP_SLURM_UNAVAILABLE=$(printf '%s\n' "$slurm_error" | tail -n1)
    export DASKDP_SLURM_UNAVAILABLE="${DASKDP_SLURM_UNAVAILABLE:-scripts/slurm.sh failed}"
    echo "SLURM unavailable, its tests will be skipped: $DASKDP_SLURM_UNAVAILABLE" >&2
fi
.venv/bin/ruff check daskdp tests benchmarks tools
.venv/bin/ruff format --check daskdp tests benchmarks tools
.venv/bin/python -m pytest "$@"
