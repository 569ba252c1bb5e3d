#!/usr/bin/env bash
# Make the embedded default's dataset available: Debian's dataset-fashion-mnist package.
#   get_data.sh          install it if missing and apt is usable (root, or sudo without a password)
#   get_data.sh --check  exit 0 if the files are there, 1 otherwise (installs nothing)
set -u
dir=/usr/share/datasets/fashion-mnist
have() { [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; }
if have; then exit 0; fi
[ "${1:-}" = "--check" ] && exit 1
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
if [ "$sudo" != none ] && command -v apt-get >/dev/null; then
  echo "Installing Debian package dataset-fashion-mnist (files under $dir) ..."
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
    $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }
fi
if have; then exit 0; fi
echo "NOTICE: Fashion-MNIST could not be installed (needs apt as root or passwordless sudo:"
echo "NOTICE:   apt-get install dataset-fashion-mnist). The pipeline will fall back to mnist5k."
exit 0
