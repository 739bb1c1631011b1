#!/usr/bin/env bash
# Install dnnlab into .venv and train the default network (the book's exercise-8 MLP) on Fashion-MNIST.
# The data come from $DNNLAB_DATA, the user cache or a system copy; else torchvision downloads them; if that fails
# too (no internet), Debian's dataset-fashion-mnist package is installed with apt-get. Extra arguments are
# passed to `dnnlab train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "quickstart: looking for Fashion-MNIST (\$DNNLAB_DATA, the user cache, a system copy, else a torchvision download)"
if ! found=$(.venv/bin/dnnlab data fashion_mnist 2>&1); then
  why=$(grep -o "torchvision download into [^;]*" <<<"$found" || echo "$found")
  echo "quickstart: Fashion-MNIST is not on this machine, and the $why did not work"
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "quickstart: installing Debian's dataset-fashion-mnist with apt-get instead"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
    .venv/bin/dnnlab data fashion_mnist
  else
    echo "quickstart: no apt-get to install Debian's copy either; set DNNLAB_DATA (see README)" >&2
    exit 1
  fi
else
  echo "$found"
fi
.venv/bin/dnnlab train trainer.epochs=5 "$@"
