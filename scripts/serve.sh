#!/usr/bin/env bash
# Start the service on the bundled models (models/*.onnx) on a machine that has never seen mien:
# make .venv, install the serving dependencies only (no torch), run `mien serve`.
# Settings come from MIEN_* variables (README); extra arguments go to `mien serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# lenient: maps service/ to mien.service (see scripts/test.sh and pyproject.toml)
.venv/bin/pip install -q -e . --config-settings editable_mode=lenient
exec .venv/bin/mien serve "$@"
