#!/usr/bin/env bash
# Quickstart / local launcher.
#   bash launch/local.sh                       # tiny model on CPU, embedded corpus
#   bash launch/local.sh CONFIG [key=value ...]
#   NPROC=2 bash launch/local.sh configs/tiny.yaml parallel.tp=2
# Sets up .venv on first use, trains, checkpoints, prints a sample. Rerunning the same
# command resumes from the run directory's latest checkpoint.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
source "$REPO_ROOT/launch/setup_env.sh"
CONFIG="${1:-configs/tiny.yaml}"
shift || true
NPROC="${NPROC:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
if [ "$NPROC" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" -m dlm_megatron.train "$CONFIG" "$@"
else
  exec python -m dlm_megatron.train "$CONFIG" "$@"
fi
