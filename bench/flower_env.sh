#!/usr/bin/env bash
# Flower's own virtual environment for bench/bench_flower.py (flwr needs protobuf < 7; kept apart from .venv).
# Flower's side of the benchmark exchanges numpy arrays only, so no torch is installed here.
# Usage: bench/flower_env.sh [VENV_DIR]   (default: bench/.flower/.venv; idempotent)
set -euo pipefail
VENV="${1:-$(dirname "$0")/.flower/.venv}"
PYTHON="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import flwr, numpy' 2>/dev/null; then
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q 'flwr==1.42.*' numpy
"$VENV/bin/python" -c 'import flwr; print("flwr", flwr.__version__, "in", "'"$VENV"'")'
