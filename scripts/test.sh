#!/usr/bin/env bash
# The whole test suite on a machine that has never seen mien: make .venv, install mien with its
# train and dev extras, lint, run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: 2.13.0 is a CPU build on this project's machines; an unpinned torch pulls a 5 GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
# lenient (setuptools' default, named so a new default cannot change it): the editable install maps training/,
# export/ and service/ to mien.training, mien.export and mien.service, and finds modules added later without a
# reinstall. strict does not work here: the checkout's own mien/ would shadow the mapped packages (pyproject.toml).
.venv/bin/pip install -q -e ".[train,dev]" --config-settings editable_mode=lenient
# The face detector's weights (for `mien export detector` and its reproducibility test). --no-deps: the
# package pins torch<2.3 and needs torchvision; the export reads only its weight files and never imports it.
.venv/bin/pip install -q --no-deps facenet-pytorch==2.6.0
# Debian packages that tests drive: Chromium for the web page's browser tests (tests/test_web_page.py; Playwright
# downloads no browser) and HAProxy in front of two `mien serve` for the failover test (tests/test_failover.py).
# Installed here when missing and we are root, in one apt-get call; without chromium the browser tests skip and say
# why; without haproxy the failover test skips on a workstation and fails under CI (the variable CI set).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing Debian's ${missing[*]} for the browser and failover tests (apt-get)"
    { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >/dev/null || echo "test.sh: ${missing[*]} could not be installed; the tests that need them will skip or fail"
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest -q "$@"
