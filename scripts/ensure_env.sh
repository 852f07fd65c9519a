#!/usr/bin/env bash
# Create or refresh .venv so that run_all.sh and run_tests.sh work on a fresh machine: every
# dependency at the version pinned in requirements.lock, then bloodcell itself (editable,
# no dependency resolution of its own). A second run with nothing changed only compares a
# stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.bloodcell-stamp"
LOCK=requirements.lock
# Everything that decides what gets installed; any change triggers a refresh.
want=$(cat pyproject.toml "$LOCK" scripts/ensure_env.sh | sha256sum | cut -d' ' -f1)

kernel_ok() {
  [ -f "$VENV/share/jupyter/kernels/bloodcell/kernel.json" ]
}

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && kernel_ok; then
  exit 0
fi

# torch 2.14.1 / torchvision 0.29.1 wheels for CPython 3.11 lie on this machine's disk;
# prefer 3.11 so pip takes them from there instead of downloading.
base_python=${BLOODCELL_PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$PY" ]; then
  echo "[ensure_env] creating $VENV with $($base_python --version 2>&1)"
  "$base_python" -m venv "$VENV"
fi
echo "[ensure_env] installing the pinned dependencies of $LOCK into $VENV (first time: a few minutes)"
"$PY" -m pip install --quiet -r "$LOCK"  # pip, setuptools and wheel included
"$PY" -m pip install --quiet --no-deps -e .
# The kernel lives inside the venv (sys-prefix), so each checkout runs its own interpreter.
"$PY" -m ipykernel install --sys-prefix --name bloodcell --display-name "Python (bloodcell)" >/dev/null
echo "$want" > "$STAMP"
echo "[ensure_env] ready: $("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
