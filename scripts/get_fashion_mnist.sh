#!/usr/bin/env bash
# `make data`: make Fashion-MNIST available to `mobilenetv3 train/eval --data fashion-mnist`, in this order:
#   1. already there: --data-dir's default places ($MOBILENETV3_DATA, /usr/share/datasets/fashion-mnist, the cache);
#   2. Debian's dataset-fashion-mnist package, when this runs as root and apt-get exists (as on CI);
#   3. torchvision's download into the cache (~/.cache/mobilenetv3, or $MOBILENETV3_CACHE);
#   4. else one line saying exactly what to run, and exit 2.
# Usage: bash scripts/get_fashion_mnist.sh [PYTHON]   (default .venv/bin/python)
set -uo pipefail
PY=${1:-.venv/bin/python}

have_data() {  # exit 0 when the four idx files are found; never downloads
  "$PY" -c 'from mobilenetv3.data import fashion_mnist; fashion_mnist.locate(download=False)' 2>/dev/null
}

if have_data; then
  exit 0
fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist (apt-get)"
  # the package lists may be missing or stale on a fresh machine: update once, quietly
  if { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
       || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
     && have_data; then
    exit 0
  fi
  echo "Fashion-MNIST: apt-get could not install dataset-fashion-mnist; trying torchvision's download"
fi

echo "Fashion-MNIST: downloading with torchvision into the cache"
if "$PY" -c 'from mobilenetv3.data import fashion_mnist; fashion_mnist.locate(download=True)' 2>/dev/null; then
  exit 0
fi

cache=$("$PY" -c 'from mobilenetv3.files import cache_dir; print(cache_dir() / "fashion-mnist")' 2>/dev/null \
        || echo "~/.cache/mobilenetv3/fashion-mnist")
echo "error: Fashion-MNIST is not installed and could not be downloaded; run 'sudo apt-get install dataset-fashion-mnist'" \
     "(Debian/Ubuntu), or put the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist" \
     "into $cache, then run 'make demo' (or 'make data') again" >&2
exit 2
