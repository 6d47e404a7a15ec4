#!/usr/bin/env bash
# Set up (if needed) and run the default federated job: SmolLM2-135M-Instruct across the
# default mixed fleet of 8 emulated devices. Extra arguments go to `fedlora simulate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec fedlora simulate --out "${OUT:-runs/demo}" "$@"
