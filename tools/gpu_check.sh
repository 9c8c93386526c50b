#!/usr/bin/env bash
# The one-shot GPU check: proves the CUDA path and measures kernels, memory and MFU on ONE GPU.
#
#   bash tools/gpu_check.sh                     # all stages; results under $OUT (default gpu_check_out/)
#   bash tools/gpu_check.sh --stages 1,4        # only some stages (0 = setup runs whenever wheels are present)
#   bash tools/gpu_check.sh --dry-run           # CPU: check every stage's command lines, configs and files
#
# Stages (each under its own timeout, each with its log $OUT/stageN.log):
#   0 setup     install the carried wheels (.whl/, made by tools/gpu_wheels.sh), record versions,
#               nvidia-smi and pip freeze, tokenize the builtin corpus once
#   1 kernels   bf16 GEMM 8192^3 peak, SDPA flash fwd+bwd at 8B shapes, FlexAttention vs dense
#               masked SDPA on the 2L block-diffusion mask (2L = 8192), numerical match
#   2 tests     pytest -m gpu (bf16 training on DeepSpeed ZeRO 0/1 and the megatron engine, bf16 vs
#               fp32, sdpa vs dense, block diffusion with flex, background saves = synchronous), in parallel
#   3 slices    configs/8b.yaml and 8b_block.yaml at 2 and 4 layers: memory and tokens/s vs the planner
#   4 mfu       configs/1b.yaml masked (sdpa; DeepSpeed and megatron engines) and block (flex) MFU
# The last thing printed is a short table (also $OUT/summary.md); copy it into docs/BENCHMARKS.md
# with the card and date. The GPU machine has no network: wheels travel in .whl/ (see
# tools/gpu_wheels.sh: megatron-core, DeepSpeed built without ops, pydantic, hjson) and the
# repository is the working tree. Exit status: 0 when every stage
# that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES="0,1,2,3,4"
DRY=0
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) STAGES="${2:?--stages needs a list such as 1,3}"; shift 2 ;;
    --stages=*) STAGES="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for s in ${STAGES//,/ }; do
  case "$s" in 0|1|2|3|4) ;; *) echo "gpu_check.sh: error: --stages takes numbers 0-4, got '$s'" >&2; exit 2 ;; esac
done
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_SILENT=true CUDA_DEVICE_MAX_CONNECTIONS=1 \
       PYTHONWARNINGS=ignore TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/dlm_inductor}"
: > "$OUT/summary.tsv"
want() { [[ ",$STAGES," == *",$1,"* ]]; }

# stage N NAME LIMIT_SECONDS CMD...: run, log to $OUT/stageN.log (appended) and stdout, record rc and time
stage() {
  local n=$1 name=$2 limit=$3; shift 3
  local t0=$(date +%s)
  echo "== stage $n $name (limit ${limit}s): $*" | tee -a "$OUT/stage$n.log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/stage$n.log"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  [ "$rc" = 124 ] && echo "!! stage $n $name hit its ${limit}s limit" | tee -a "$OUT/stage$n.log"
  printf '%s\t%s\t%s\t%s\n' "$n" "$name" "$rc" "$dt" >> "$OUT/summary.tsv"
  return 0
}

# Every stage's command line is written once: the dry run executes the same one with the
# tool's --dry-run (pytest: --collect-only), so a renamed flag or key fails on CPU first.
# Limits (seconds): the first H200 run took 342 s for stages 0-4 (stage 2: 83 s with -n 8);
# the table printed last has each stage's seconds for the next revision of these numbers.
LIMITS=(45 70 150 90 55)   # stage 0..4 (stage 4: per run; its block run gets +20)
DRYFLAG=(); [ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
lim() { [ "$DRY" = 1 ] && echo 300 || echo "${LIMITS[$1]}"; }  # CPU dry runs import megatron and DeepSpeed: slower
echo "gpu_check.sh: stages $STAGES; worst case (every limit) $(( ${LIMITS[0]} + ${LIMITS[1]} + ${LIMITS[2]} + ${LIMITS[3]} + 3 * ${LIMITS[4]} + 20 ))s, expected about 340s for all"

# ---- 0. setup ---------------------------------------------------------------------------
PIP_INSTALL=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
CORPUS=("$PY" -c "from dlm_megatron.data.corpus import prepare_builtin_corpus; from dlm_megatron.data.tokenizer import load_tokenizer; print(prepare_builtin_corpus('.cache/data', load_tokenizer('builtin')))")
if ls .whl/*.whl >/dev/null 2>&1; then
  # every later stage needs the wheels on the path, whichever stages were asked for
  echo "installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site$([ "$DRY" = 1 ] && echo ' (pip --dry-run)')"
  "${PIP_INSTALL[@]}" "${DRYFLAG[@]}" .whl/*.whl > "$OUT/pip_install.txt" 2>&1 \
    || { cat "$OUT/pip_install.txt"; echo "gpu_check.sh: error: wheel install failed"; exit 1; }
  [ "$DRY" = 0 ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
elif [ "$DRY" = 0 ]; then
  echo "gpu_check.sh: warning: no .whl/ (bash tools/gpu_wheels.sh makes it); using what this Python has"
fi
if want 0; then
  if [ "$DRY" = 1 ]; then
    stage 0 setup "$(lim 0)" bash -c "$PY -c \"import torch, megatron.core, deepspeed; print('torch', torch.__version__, 'mcore', megatron.core.__version__, 'deepspeed', deepspeed.__version__)\" && ${CORPUS[*]@Q}"
  else
    stage 0 setup "$(lim 0)" bash -c "
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
      $PY -c \"import torch, megatron.core, deepspeed, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'mcore', megatron.core.__version__, 'deepspeed', deepspeed.__version__, 'device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())\"
      $PY -c \"import transformer_engine\" 2>/dev/null && echo 'transformer_engine: installed' || echo 'transformer_engine: absent'
      $PY -m pip list --format=freeze 2>/dev/null | tr '\n' ' '; echo
      ${CORPUS[*]@Q}"
  fi
fi

# ---- 1. kernels -------------------------------------------------------------------------
want 1 && stage 1 kernels "$(lim 1)" "$PY" benchmarks/gpu_kernels.py --repeats 8 --out "$OUT/kernels.json" "${DRYFLAG[@]}"

# ---- 2. CUDA tests ----------------------------------------------------------------------
# -n 10: the tests are small and the card has room for them side by side
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m gpu -n 10 --timeout 140 -rA tests/gpu)
[ "$DRY" = 1 ] && PYTEST+=(--collect-only)
want 2 && stage 2 tests "$(lim 2)" "${PYTEST[@]}"

# ---- 3. 8B slices vs the planner --------------------------------------------------------
# as launch/slurm_8b.sh runs: the first check (without it) reserved ~10 GiB over allocated
want 3 && PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}" \
  stage 3 slices "$(lim 3)" "$PY" benchmarks/gpu_slices.py --steps 3 --out "$OUT/slices.json" "${DRYFLAG[@]}"

# ---- 4. MFU through the real trainer ----------------------------------------------------
if want 4; then
  GEMM=$("$PY" -c "import json,sys; r=json.load(open('$OUT/kernels.json'))['rows']; print(r[0]['tflops'])" 2>/dev/null || true)
  MFU_COMMON=(--steps 12 --warmup 4 ${GEMM:+--gemm-tflops $GEMM} model.transformer_impl=local train.precision=bf16 parallel.tp=1
              train.micro_batch_size=8 train.global_batch_size=8 diffusion.random_length_prob=0.0)
  LIM=$(lim 4)
  stage 4 mfu-1b-masked-deepspeed "$LIM" "$PY" benchmarks/bench_mfu.py "${DRYFLAG[@]}" --config configs/1b.yaml --label "1b masked sdpa, DeepSpeed ZeRO-1" \
    "${MFU_COMMON[@]}" model.attention_backend=sdpa parallel.engine=deepspeed parallel.zero_stage=1
  stage 4 mfu-1b-masked-megatron "$LIM" "$PY" benchmarks/bench_mfu.py "${DRYFLAG[@]}" --config configs/1b.yaml --label "1b masked sdpa, megatron engine" \
    "${MFU_COMMON[@]}" model.attention_backend=sdpa parallel.engine=megatron parallel.zero_stage=1
  stage 4 mfu-1b-block-flex "$((LIM + 20))" "$PY" benchmarks/bench_mfu.py "${DRYFLAG[@]}" --config configs/1b.yaml --label "1b block (16) flex, DeepSpeed ZeRO-1" \
    "${MFU_COMMON[@]}" diffusion.objective=block diffusion.block_size=16 train.micro_batch_size=4 train.global_batch_size=4 \
    model.attention_backend=flex parallel.engine=deepspeed parallel.zero_stage=1
fi

# ---- summary ----------------------------------------------------------------------------
{
  echo
  echo "## GPU check $(date -u +%F)$([ "$DRY" = 1 ] && echo ' (dry run, CPU)') on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "| stage | name | exit | seconds |"
  echo "|---|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$OUT/summary.tsv"
  echo
  for n in 1 2 3 4; do [ -f "$OUT/stage$n.log" ] && grep -h -E '^\|' "$OUT/stage$n.log" | awk '!seen[$0]++'; done
  [ -f "$OUT/stage2.log" ] && grep -h -E '(passed|failed|error)' "$OUT/stage2.log" | tail -1
} | tee "$OUT/summary.md"
rm -f "$OUT/pip_install.txt"
awk -F'\t' '$3 != 0 {bad=1} END {exit bad}' "$OUT/summary.tsv"; rc=$?
rm -f "$OUT/summary.tsv"  # in summary.md; the device tool brings back at most 8 files
exit $rc
