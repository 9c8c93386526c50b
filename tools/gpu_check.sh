#!/usr/bin/env bash
# GPU check: the CUDA-only tests and the throughput/MFU benchmark on ONE GPU machine.
#
#   bash tools/gpu_check.sh              # writes results under $OUT (default: gpu_check_out/)
#
# The GPU machines have no network. Their image has Python 3.12 with CUDA torch, numpy,
# tokenizers, safetensors, pyyaml, pytest, einops; the rest travels as wheels in .whl/,
# prepared on a networked machine with `bash tools/gpu_wheels.sh` (megatron-core, DeepSpeed
# built without ops, wandb, webdataset and their pure-Python deps). Prints a short table last;
# copy it into docs/BENCHMARKS.md with the card and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_SILENT=true CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, megatron.core, deepspeed; print('torch', torch.__version__, 'mcore', megatron.core.__version__, 'deepspeed', deepspeed.__version__)" | tee "$OUT/versions.txt"

# 1. CUDA-only tests (bf16, TE spec when installed, sequence parallel with >=2 GPUs,
#    block diffusion's flex attention training).
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. Throughput / MFU of the 1B preset in bf16 (local spec unless TE is installed).
IMPL=local; "$PY" -c "import transformer_engine" 2>/dev/null && IMPL=transformer_engine
timeout 300 "$PY" benchmarks/bench_mfu.py --config configs/1b.yaml --steps 25 --warmup 8 --out "$OUT/mfu_1b.json" \
    model.transformer_impl=$IMPL train.precision=bf16 train.micro_batch_size=8 train.global_batch_size=8 parallel.zero_stage=0 \
    2>&1 | tee "$OUT/mfu.log"

# 3. Block diffusion: block-sparse (flex) vs dense attention for the 2L mask.
if [ -f benchmarks/bench_block.py ]; then
  timeout 200 "$PY" benchmarks/bench_block.py --gpu-attention 2>&1 | tee "$OUT/block_attention.log"
fi

echo
echo "## GPU check $(date -u +%F) on $(head -1 "$OUT/gpu.txt")"
echo "tests: $(tail -1 "$OUT/gpu_tests.log")"
grep -h "^|" "$OUT/mfu.log" "$OUT/block_attention.log" 2>/dev/null
exit $tests_rc
