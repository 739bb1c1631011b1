#!/usr/bin/env bash
# Install dnnlab with its test dependencies into .venv and run the whole test suite (slow real-data tests too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# Two workers (pytest-xdist): most tests train on one thread, so both cores of a 2-core machine are used.
.venv/bin/python -m pytest -n "${DNNLAB_TEST_WORKERS:-2}" "$@"
