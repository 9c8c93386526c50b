#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install dlm_megatron into it (editable).
# Sourced by launch/local.sh and tests/run.sh. Re-installs only when setup.py or
# constraints.txt change (a stamp file records their hash).
#   PYTHON=python3.11   interpreter for a new venv (default: python3)
#   TORCH_SPEC=...       torch requirement when torch is missing (default: torch==2.13.0,
#                        the CPU build; on GPU clusters pre-install the CUDA build instead)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.dlm_megatron_installed"
WANT="$(cat "$REPO_ROOT/setup.py" "$REPO_ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing dependencies into .venv (about 1-2 minutes on a fresh machine)"
  t0=$(date +%s)
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" >/dev/null 2>&1; then
    # torch first and alone: otherwise the resolver may pick a multi-GB CUDA build.
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  # DeepSpeed: pure-Python install, no prebuilt CUDA ops.
  DS_BUILD_OPS=0 python -m pip install -q -c "$REPO_ROOT/constraints.txt" -e "$REPO_ROOT[test]"
  echo "$WANT" > "$STAMP"
  echo "[setup] done in $(( $(date +%s) - t0 ))s"
fi
