#!/usr/bin/env bash
# Create .venv and install dnnlab into it, editable, with the given extras (e.g. "test", "all"; see pyproject.toml).
# torch and torchvision are the releases this project is tested with. PyPI's torch for x86_64 Linux comes with
# CUDA's libraries (about 5 GB in .venv); on a machine without a GPU, PyTorch's CPU-only wheels are a fraction of
# that: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/install.sh (where that index is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
say() { echo "install: $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
torch=("torch==2.14.1" "torchvision==0.29.1")
installed=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | { grep -E "^(torch|torchvision)==" || true; } \
  | sed "s/+.*//" | sort | xargs)  # (a local version such as 2.14.1+cpu is the same release)
if [ "$installed" = "${torch[*]}" ]; then
  say "${torch[*]} already installed"
else
  say "${torch[*]}${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} (the first time, a download of up to 3 GB)"
  .venv/bin/python -m pip install --progress-bar on ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${torch[@]}"
fi
say "dnnlab${extras:+ with the extras [$extras]} (editable) and its dependencies"
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
# Build the native training step now rather than in the first run (about 10 s; without a C++ compiler, training
# takes the autograd path and this says why).
say "building dnnlab's native training step"
.venv/bin/python -m dnnlab.fast.native || true
