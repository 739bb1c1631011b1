#!/usr/bin/env bash
# Create .venv (Python 3.11) and install dnnlab into it, editable, with the given extras (e.g. "test").
# torch and torchvision are pinned to the releases this project is tested with (CUDA build on x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
# Build the native training step now rather than in the first run (about 10 s; without a C++ compiler, training
# takes the autograd path and this says why).
.venv/bin/python -m dnnlab.native || true
