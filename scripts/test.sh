#!/usr/bin/env bash
# Set up .venv with the test tools, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check daskdp tests benchmarks tools
.venv/bin/ruff format --check daskdp tests benchmarks tools
.venv/bin/python -m pytest "$@"
