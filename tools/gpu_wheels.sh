#!/usr/bin/env bash
# Prepare .whl/ for tools/gpu_check.sh (run on a machine with package-registry access).
# The GPU image runs CPython 3.12 on x86-64 and already has torch, numpy, tokenizers,
# safetensors, pyyaml, pytest, einops, msgpack, ninja, psutil, py-cpuinfo, packaging.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$@"; }
dl megatron-core==0.16.1 wandb==0.31.0 webdataset==1.0.2 braceexpand hjson pydantic pydantic-core \
   annotated-types typing-inspection sentry-sdk gitpython gitdb smmap platformdirs protobuf
# DeepSpeed ships as an sdist: build a pure-Python wheel (no CUDA ops) here.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
# this repository itself is carried as the working tree (PYTHONPATH), not as a wheel
ls -la .whl
