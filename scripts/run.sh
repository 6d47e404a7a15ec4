#!/usr/bin/env bash
# Set up (if needed) and run the default federated job over a real MQTT broker: an embedded
# broker, the coordinator and one process per device of the default mixed fleet of 8, training
# SmolLM2-135M-Instruct. Extra arguments go to `fedlora emulate` (e.g. --preset quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec fedlora emulate --out "${OUT:-runs/demo}" "$@"
