"""Under CI a skip must not hide a broken setup.

CI (``CI=true``, as GitHub Actions and most runners set it) runs as root with apt, a
compiler and the package index, so every test there can run: a skip caused by a failed
build, a missing package, no root or no apt, or ``DLM_SKIP_LLAMA_CPP_BUILD`` means the
setup broke, and is reported as a failure. The one legitimate skip is a GPU test (marked
``gpu``) skipped for want of a GPU: its reason must say so (CUDA, GPU); any other skip of a
GPU test (a missing package such as Transformer Engine) fails too. Outside CI skips stay
skips, so a laptop without root or a compiler still runs the rest of the suite.

Loaded by tests/conftest.py; tests/unit/test_ci_strict.py runs it on a throwaway suite.
"""
from __future__ import annotations

import os
import re

import pytest

# a GPU test's skip is legitimate only for want of a GPU (or of enough of them)
NO_GPU = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)


def ci_strict() -> bool:
    """True when the suite runs under CI (CI=true/1/yes)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and ci_strict()) or hasattr(rep, "wasxfail"):
        return
    reason = _reason(rep.longrepr)
    if item.get_closest_marker("gpu") is not None and NO_GPU.search(reason):
        return
    rep.outcome = "failed"
    rep.longrepr = (f"skipped under CI=true, where a skip means a broken setup (only tests marked 'gpu' may skip, "
                    f"and only for want of a GPU): {reason}")
