#!/usr/bin/env bash
# Install dnnlab into .venv and train the default network (the book's exercise-8 MLP) on Fashion-MNIST.
# The data come from $DNNLAB_DATA, the user cache or a system copy; else torchvision downloads them; if that fails
# too (no internet), Debian's dataset-fashion-mnist package is installed with apt-get. Extra arguments are
# passed to `dnnlab train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if ! .venv/bin/dnnlab data fashion_mnist; then
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "quickstart: the download failed; installing Debian's dataset-fashion-mnist with apt-get instead"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
    .venv/bin/dnnlab data fashion_mnist
  else
    echo "quickstart: no Fashion-MNIST found and no apt-get to install it; set DNNLAB_DATA (see README)" >&2
    exit 1
  fi
fi
.venv/bin/dnnlab train trainer.epochs=5 "$@"
