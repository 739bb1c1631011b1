#!/usr/bin/env bash
# Install dnnlab with its test dependencies into .venv and run the whole test suite (slow real-data tests too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
.venv/bin/python -m pytest "$@"
