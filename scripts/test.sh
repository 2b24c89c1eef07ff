#!/usr/bin/env bash
# The whole test suite on a machine that has never seen mien: make .venv, install mien with its
# train and dev extras, lint, run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: 2.13.0 is a CPU build on this project's machines; an unpinned torch pulls a 5 GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[train,dev]"
# The face detector's weights (for `mien export detector` and its reproducibility test). --no-deps: the
# package pins torch<2.3 and needs torchvision; the export reads only its weight files and never imports it.
.venv/bin/pip install -q --no-deps facenet-pytorch==2.6.0
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest -q "$@"
