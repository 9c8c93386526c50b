#!/usr/bin/env bash
# Production pretraining of configs/8b.yaml (LLaDA-8B shape) on Slurm.
#
# Layout (default): 8 nodes x 8 H100 80GB = 64 GPUs, one torchrun per node with 8 workers;
#   parallel.tp=2 (tensor parallel inside a node, over NVLink), parallel.pp=1,
#   dp=32 data-parallel ranks with DeepSpeed ZeRO-1 (parallel.zero_stage=1),
#   global batch 1280 x 4096 tokens = micro 2 x 20 accumulation steps x 32 ranks
#   (tools/plan.py configs/8b.yaml --gpus 64 --gpu-mem-gib 80: about 75% of each GPU).
# Other sizes: the data-parallel degree follows the node count (world / tp); keep
# train.global_batch_size a multiple of micro_batch_size * dp (16 nodes: dp=64, 10 steps).
#
# Two ways to submit (from the repository root, or set DLM_REPO):
#   1) sbatch with its own options (command-line options win over this header):
#        mkdir -p logs
#        sbatch [-N 16] [-p gpu] [-A myproj] [-t 48:00:00] launch/slurm_8b.sh [key=value ...]
#   2) run it with bash: it submits itself, taking the layout from the environment:
#        NODES=16 PARTITION=gpu ACCOUNT=myproj TIME=48:00:00 bash launch/slurm_8b.sh [key=value ...]
#      NODES, GPUS_PER_NODE (8), TIME, PARTITION, ACCOUNT, QOS, JOB_NAME, SBATCH_EXTRA
#      (more sbatch options, word-split); DLM_DRY_RUN=1 prints the sbatch command instead.
#      sbatch's own SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_TIMELIMIT work in both ways.
# In the job: DLM_8B_LAYOUT overrides the layout keys (default below); key=value arguments
# come after them and win. NCCL_* / UCX_* / FI_* pass through; everything else (venv,
# NPROC_PER_NODE, preemption with --signal=B:USR1@300 and self-requeue, resume from
# checkpoints/latest) is launch/slurm.sh's logic, which this script execs.
#
#SBATCH --job-name=dlm-8b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

CONFIG_8B="configs/8b.yaml"
DEFAULT_LAYOUT="parallel.tp=2 parallel.pp=1 parallel.zero_stage=1"

is_repo() { [ -n "$1" ] && [ -d "$1/dlm_megatron" ] && [ -f "$1/launch/slurm.sh" ]; }

if [ -z "${SLURM_JOB_ID:-}" ] || [ "${ENVIRONMENT:-}" != "BATCH" ]; then
  # ---- submit mode: bash launch/slurm_8b.sh [key=value ...] ----------------------------
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  args=()
  [ -n "${NODES:-}" ] && args+=("--nodes=$NODES")
  [ -n "${GPUS_PER_NODE:-}" ] && args+=("--gpus-per-node=$GPUS_PER_NODE")
  [ -n "${TIME:-}" ] && args+=("--time=$TIME")
  [ -n "${PARTITION:-}" ] && args+=("--partition=$PARTITION")
  [ -n "${ACCOUNT:-}" ] && args+=("--account=$ACCOUNT")
  [ -n "${QOS:-}" ] && args+=("--qos=$QOS")
  [ -n "${JOB_NAME:-}" ] && args+=("--job-name=$JOB_NAME")
  # shellcheck disable=SC2206
  [ -n "${SBATCH_EXTRA:-}" ] && args+=(${SBATCH_EXTRA})
  cmd=(sbatch --export=ALL,DLM_REPO="${DLM_REPO:-$here}" ${args[@]+"${args[@]}"} "$here/launch/slurm_8b.sh" "$@")
  if [ -n "${DLM_DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
  fi
  mkdir -p logs
  exec "${cmd[@]}"
fi

# ---- batch mode ----------------------------------------------------------------------------
if [ -z "${DLM_REPO:-}" ]; then
  for cand in "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd || true)" "${SLURM_SUBMIT_DIR:-}"; do
    if is_repo "$cand"; then DLM_REPO="$cand"; break; fi
  done
fi
if ! is_repo "${DLM_REPO:-}"; then
  echo "slurm_8b.sh: cannot find the dlm_megatron checkout: submit from the repository root or set DLM_REPO" >&2
  exit 2
fi
export DLM_REPO
if [ -n "${NODES:-}" ] && [ "${NODES}" != "${SLURM_JOB_NUM_NODES:-}" ]; then
  echo "slurm_8b.sh: note: NODES=$NODES is ignored inside the job (it has ${SLURM_JOB_NUM_NODES:-?} nodes); use sbatch -N or bash launch/slurm_8b.sh" >&2
fi
# megatron-core's tensor-parallel layers (async grad all-reduce) want one CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# On an H200 the 8B slices reserved ~10 GiB more than they allocated (docs/BENCHMARKS.md):
# expandable segments let the caching allocator grow blocks instead of splitting new ones.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
CONFIG="$CONFIG_8B"
[ -f "$CONFIG" ] || CONFIG="$DLM_REPO/$CONFIG_8B"
# shellcheck disable=SC2086
exec bash "$DLM_REPO/launch/slurm.sh" "$CONFIG" ${DLM_8B_LAYOUT:-$DEFAULT_LAYOUT} "$@"
