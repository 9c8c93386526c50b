#!/usr/bin/env bash
# Generic Slurm launcher: one torchrun per node, N processes per node.
#
#   mkdir -p logs     # Slurm does not create the --output directory
#   sbatch [sbatch options] launch/slurm.sh CONFIG [key=value ...]
#   sbatch -N 4 -t 12:00:00 -p gpu -A myproj --gpus-per-node=8 --exclusive \
#          launch/slurm.sh configs/1b.yaml train.output_dir=runs/1b
#
# The header below only sets defaults; every sbatch option given on the command line wins
# (nodes, time, partition, account, gres, --signal, --output, ...). No GPU directives here:
# the same script runs on CPU clusters.
#
# Environment (read in the batch job; sbatch exports the submitting shell's environment):
#   NPROC_PER_NODE   processes per node (default: GPUs on the node from SLURM_GPUS_ON_NODE
#                    or nvidia-smi, else 1)
#   MASTER_PORT      rendezvous port on the first node (default: derived from the job id)
#   DLM_REPO         repository root (default: this script's checkout, else the submit dir)
#   DLM_VENV         virtualenv to activate (default: $DLM_REPO/.venv when present)
#   DLM_SRUN_ARGS    extra srun options, e.g. "--cpu-bind=none" or "--gpus-per-node=8"
#   DLM_TORCHRUN_ARGS extra torchrun options
#   NCCL_*, UCX_*, FI_*, ... pass through unchanged (srun --export=ALL).
#
# Preemption and requeue: Slurm sends SIGUSR1 to this batch shell 120 s before the time
# limit (--signal=B:USR1@120; override it, e.g. --signal=B:USR1@600 for slow checkpoints),
# or send it yourself: scancel --signal=USR1 --batch JOBID. The shell forwards the stop to
# the trainer processes on every node, which finish the current step, save a checkpoint
# and exit; the shell then runs `scontrol requeue`, and the requeued job (same job id, same
# command, log appended) resumes from <train.output_dir>/checkpoints/latest.
# SLURM_RESTART_COUNT is printed at the start of every run. Exit status: 0 when training
# completed, the failing step's status otherwise.
#
#SBATCH --job-name=dlm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail

log() { echo "[slurm.sh $(date '+%F %T')] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "usage: sbatch [sbatch options] launch/slurm.sh CONFIG [key=value ...]" >&2
  echo "(this script runs inside a Slurm batch job; for a local run use launch/local.sh)" >&2
  exit 2
fi
if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch options] launch/slurm.sh CONFIG [key=value ...]" >&2
  exit 2
fi

# ---- locate the repository and its virtualenv ----------------------------------------
# Inside a batch job this file runs from a copy in slurmd's spool directory, so its own
# location only helps when it was exec'd from a checkout (launch/slurm_8b.sh does that).
is_repo() { [ -n "$1" ] && [ -d "$1/dlm_megatron" ] && [ -f "$1/launch/slurm.sh" ]; }
if [ -z "${DLM_REPO:-}" ]; then
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd || true)"
  for cand in "$here" "${SLURM_SUBMIT_DIR:-}" "${SLURM_SUBMIT_DIR:-}/.."; do
    if is_repo "$cand"; then DLM_REPO="$(cd "$cand" && pwd)"; break; fi
  done
fi
DLM_REPO="${DLM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
export DLM_REPO
if [ -n "${DLM_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$DLM_VENV/bin/activate"
elif [ -f "$DLM_REPO/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$DLM_REPO/.venv/bin/activate"
fi

CONFIG="$1"
shift
if [ ! -f "$CONFIG" ] && [ -f "$DLM_REPO/$CONFIG" ]; then
  CONFIG="$DLM_REPO/$CONFIG"
fi

# ---- layout ----------------------------------------------------------------------------
if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus="${SLURM_GPUS_ON_NODE:-}"
  if [ -z "$gpus" ] && command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  case "$gpus" in ''|0|*[!0-9]*) NPROC_PER_NODE=1 ;; *) NPROC_PER_NODE="$gpus" ;; esac
fi
export NPROC_PER_NODE
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)"
MASTER_ADDR="${MASTER_ADDR:-$(hostname)}"
MASTER_PORT="${MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0}) % 20000 ))}"
export MASTER_ADDR MASTER_PORT
# Give the workers time to finish a checkpoint when torchrun itself is told to stop.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
export PYTHONUNBUFFERED=1

log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
log "nodes=${NNODES} (${SLURM_JOB_NODELIST}) nproc_per_node=${NPROC_PER_NODE} world_size=$(( NNODES * NPROC_PER_NODE ))" \
    "rendezvous=${MASTER_ADDR}:${MASTER_PORT} python=$(command -v python || echo none)"
log "command: python -m dlm_megatron.train ${CONFIG} $*"
fabric_env="$(env | grep -E '^(NCCL|UCX|FI|TORCH_NCCL)_' | sort | tr '\n' ' ')"
[ -n "$fabric_env" ] && log "fabric environment: ${fabric_env}"

# ---- per-node part (runs under srun, one task per node) ---------------------------------
# torchrun is started with SIGUSR1 ignored (inherited across exec) so that a stop signal
# delivered to the whole step does not kill the agent; the trainer installs its own handler.
# This wrapper forwards SIGUSR1/SIGTERM to torchrun's children (the Python workers) and
# re-sends every 10 s until they exit (workers still importing ignore the first signal).
# After a stop it exits 0 even though torchrun reports the workers' preemption exit (3) as a
# failure, so that srun's --kill-on-bad-exit does not kill other nodes mid-checkpoint.
node_main() {
  local tr_pid stop=0 resender="" rc
  echo "[slurm.sh node ${SLURMD_NODENAME:-$(hostname)} SLURM_NODEID=${SLURM_NODEID:-?}] torchrun --nnodes=${NNODES} --nproc_per_node=${NPROC_PER_NODE}"
  (
    trap '' USR1
    # shellcheck disable=SC2086
    exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
      --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
      --max_restarts=0 ${DLM_TORCHRUN_ARGS:-} -m dlm_megatron.train "$@"
  ) &
  tr_pid=$!
  forward() {
    pkill -USR1 -P "$tr_pid" 2>/dev/null || true
  }
  on_stop() {
    if [ "$stop" = 0 ]; then
      stop=1
      echo "[slurm.sh node ${SLURMD_NODENAME:-$(hostname)}] stop requested: forwarding SIGUSR1 to the trainer processes"
      forward
      # (no output: a leftover holding srun's stdout open would delay the step's end)
      ( trap '' USR1 TERM; while kill -0 "$tr_pid" 2>/dev/null; do sleep 10; forward; done ) >/dev/null 2>&1 </dev/null &
      resender=$!
    fi
  }
  trap on_stop USR1 TERM
  while :; do
    wait "$tr_pid"
    rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$tr_pid" 2>/dev/null; then continue; fi  # a trapped signal
    break
  done
  if [ -n "$resender" ]; then
    pkill -P "$resender" 2>/dev/null
    kill "$resender" 2>/dev/null
  fi
  if [ "$rc" = 0 ] && [ "${SLURM_NODEID:-0}" = 0 ]; then
    : > "$DLM_DONE_MARKER" 2>/dev/null  # training completed (tells a late stop request apart)
  fi
  if [ "$stop" = 1 ] && [ "$rc" != 0 ]; then
    echo "[slurm.sh node ${SLURMD_NODENAME:-$(hostname)}] trainer stopped after the stop request (torchrun exit $rc)"
    return 0
  fi
  return "$rc"
}
export NNODES
# The batch shell runs on the first node, as does the node wrapper with SLURM_NODEID=0.
export DLM_DONE_MARKER="${TMPDIR:-/tmp}/dlm-slurm-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}.done"
rm -f "$DLM_DONE_MARKER"

# ---- batch part ------------------------------------------------------------------------
STOP=""
GOT_SIGNAL=0
SRUN_PID=""
on_signal() {
  GOT_SIGNAL=1
  [ -n "$STOP" ] && return
  STOP="$1"
  log "received SIG$1: asking the trainer to checkpoint and exit"
  # Signal every process of the running steps (not this batch shell); the node wrappers
  # forward to the workers as well. Fall back to srun's own signal forwarding.
  if ! scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null && [ -n "$SRUN_PID" ]; then
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# shellcheck disable=SC2086
srun --export=ALL --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
  ${SLURM_CPUS_ON_NODE:+--cpus-per-task="$SLURM_CPUS_ON_NODE"} \
  --kill-on-bad-exit=1 ${DLM_SRUN_ARGS:-} \
  bash -c "$(declare -f node_main); node_main \"\$@\"" dlm-node "$CONFIG" "$@" &
SRUN_PID=$!
while :; do
  GOT_SIGNAL=0
  wait "$SRUN_PID"
  rc=$?
  if [ "$GOT_SIGNAL" = 1 ] && [ "$rc" -gt 128 ]; then continue; fi  # interrupted by our trap
  break
done

done_marker_found=0
if [ -e "$DLM_DONE_MARKER" ]; then done_marker_found=1; rm -f "$DLM_DONE_MARKER"; fi
if [ "$STOP" = "USR1" ] && [ "$rc" = 0 ] && [ "$done_marker_found" = 1 ]; then
  log "training had already finished when the stop request came: not requeueing"
  exit 0
fi
if [ "$STOP" = "USR1" ]; then
  log "trainer exited (srun status $rc) after the stop request; requeueing job ${SLURM_JOB_ID}"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  log "scontrol requeue failed: resubmit the same command to resume from the checkpoint"
  exit 3
fi
if [ "$STOP" = "TERM" ]; then
  log "stopped on SIGTERM (job cancelled, timed out or preempted by Slurm; srun status $rc)"
  exit 143
fi
if [ "$rc" = 0 ]; then
  log "training finished"
else
  log "srun exited with status $rc"
fi
exit "$rc"
