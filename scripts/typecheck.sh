#!/usr/bin/env bash
# Type-check the product code (core, edge_client, coordinator, export) with mypy, configured by
# [tool.mypy] in pyproject.toml. Exits with mypy's status; arguments go to mypy.
#
# The folders' import names are fedlora_edge.core, fedlora_edge.edge_client, ... (pyproject maps
# them; the editable install resolves them with an import hook, which mypy cannot follow). So mypy
# runs in a throwaway tree, $(mktemp -d)/fedlora_edge/{core,edge_client,coordinator,export}, of
# symlinks to the repository's folders: that is how mypy sees the namespace. The paths it reports
# (fedlora_edge/core/x.py) are rewritten to the repository's (core/x.py), relative to where this
# was started from, so that they can be clicked.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=python
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi

TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT
mkdir "$TREE/fedlora_edge"
for d in core edge_client coordinator export; do
  ln -s "$ROOT/$d" "$TREE/fedlora_edge/$d"
done

# where the reported paths point: repository-relative when started from its root, else absolute
if [ "$(pwd)" = "$ROOT" ]; then PREFIX=""; else PREFIX="$ROOT/"; fi
# mypy keeps its cache in the repository (it writes a .gitignore into it), so later runs are quick
status=0
(cd "$TREE" && "$PY" -m mypy --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" \
   -p fedlora_edge.core -p fedlora_edge.edge_client -p fedlora_edge.coordinator -p fedlora_edge.export "$@") 2>&1 \
  | sed -E "s#^fedlora_edge/(core|edge_client|coordinator|export)/#${PREFIX}\1/#" || status=$?
exit "$status"
