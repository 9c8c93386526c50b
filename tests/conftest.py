import os
import sys

# tests import their helpers as `common`
sys.path.insert(0, os.path.dirname(__file__))

from ci_strict import pytest_runtest_makereport  # noqa: E402,F401  (hook: CI=true turns setup skips into failures)


def pytest_configure(config):
    for m in ("distributed: multi-process torchrun tests (gloo)", "e2e: end-to-end CLI tests",
              "slurm: tests on a real local Slurm cluster", "gpu: needs CUDA (run by tools/gpu_check.sh)"):
        config.addinivalue_line("markers", m)
