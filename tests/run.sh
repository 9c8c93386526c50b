#!/usr/bin/env bash
# The whole test suite: sets up .venv (shared with launch/local.sh) and runs every tier.
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -m "not slurm"  # extra pytest arguments are passed through
# Tiers: tests/unit (pure CPU), tests/distributed (torchrun, gloo), tests/e2e (CLI),
# tests/slurm (a real local Slurm cluster; needs root + apt), GPU tests (skipped without CUDA).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
source "$REPO_ROOT/launch/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
export WANDB_SILENT=true
t0=$(date +%s)
# Prepare the builtin corpus once so parallel tiers never race to tokenize it.
python - <<'PY'
from dlm_megatron.data.corpus import prepare_builtin_corpus
from dlm_megatron.data.tokenizer import load_tokenizer
prepare_builtin_corpus(".cache/data", load_tokenizer("builtin"))
PY
set +e
python -m pytest -q -p no:cacheprovider -rs --durations=15 tests "$@"
rc=$?
set -e
echo "[tests/run.sh] finished in $(( $(date +%s) - t0 ))s with exit code $rc"
exit $rc
