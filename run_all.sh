#!/usr/bin/env bash
# Rebuild reports/: execute every experiment's notebooks (experiments/*.yaml) with papermill
# and the `bloodcell` kernel, export HTML (code hidden), write metrics.json and index.html,
# then swap the new reports folder in atomically. See reports/README.md.
#
#   ./run_all.sh                      # the main experiments at full scale (profile full, <= 60 min on 2 CPU cores)
#   ./run_all.sh --profile complete   # every experiment at full scale, the ablations (`build: ablation`) too
#   ./run_all.sh --profile smoke      # every experiment on a tiny subset, 1 epoch (minutes)
#   ./run_all.sh --only pbc           # rebuild one experiment, keep the others' reports
#   ./run_all.sh --wait               # queue behind a running build instead of refusing
#   ./run_all.sh --help               # all options and environment variables
#
# Progress: one line per notebook as it starts ("7/45 pbc 03_evaluate: started ...; build elapsed
# 12.3 min, about 31 min left"), the estimate from the last build's seconds of what still runs.
# Environment: BLOODCELL_REPORTS (default reports/), BLOODCELL_RUNS (default runs/),
# BLOODCELL_CACHE, BLOODCELL_DATA, BLOODCELL_EXPERIMENTS (folders separated by ':').
# Exit status: 0 built; 1 a notebook failed (message names experiment, notebook, error and
# the executed notebook; the previous reports stay); 2 bad usage or experiment file;
# 75 another build holds the lock (use --wait); 130 interrupted (SIGTERM or Ctrl-C: the running
# notebook's kernel is killed at once, the previous reports stay).
set -euo pipefail

# Paths given relative to the caller's folder stay relative to it.
for var in BLOODCELL_REPORTS BLOODCELL_RUNS BLOODCELL_CACHE BLOODCELL_DATA; do
  if [ -n "${!var:-}" ]; then
    export "$var=$(realpath -m -- "${!var}")"
  fi
done
if [ -n "${BLOODCELL_EXPERIMENTS:-}" ]; then
  IFS=: read -r -a _dirs <<< "$BLOODCELL_EXPERIMENTS"
  _abs=()
  for d in "${_dirs[@]}"; do [ -n "$d" ] && _abs+=("$(realpath -m -- "$d")"); done
  BLOODCELL_EXPERIMENTS=$(IFS=:; echo "${_abs[*]}")
  export BLOODCELL_EXPERIMENTS
fi

cd "$(dirname "$0")"
if [ -x scripts/ensure_env.sh ]; then
  scripts/ensure_env.sh
fi
exec .venv/bin/python -m bloodcell_lib build "$@"
