#!/usr/bin/env bash
# Set up (if needed), then the one check: lint, types, then the tests.
# FEDLORA_SLOW=1 also runs the slow tier (the real SmolLM2 model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "== lint (ruff)"
ruff check core edge_client coordinator export bench tests
echo "== types (mypy)"
bash scripts/typecheck.sh
echo "== tests"
if [ "${FEDLORA_SLOW:-0}" = "1" ]; then
  exec python -m pytest -m "slow or not slow" "$@"
else
  exec python -m pytest "$@"
fi
