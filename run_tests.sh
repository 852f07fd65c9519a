#!/usr/bin/env bash
# The test command: set up the environment if needed, then run every test.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k audit).
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_env.sh
# The report tests drive Debian's Chromium headless; install it when missing.
if ! command -v chromium >/dev/null 2>&1; then
  echo "[run_tests] installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null
  fi
fi
exec .venv/bin/python -m pytest -ra "$@"
