#!/usr/bin/env bash
# `make demo`: a few minutes on 2 CPU cores.  Extended by the training issue (train, eval, plot, predict).
set -euo pipefail
PY=${1:-.venv/bin/python}
$PY -m mobilenetv3 profile
