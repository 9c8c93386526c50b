"""Under CI a skip must not hide a broken setup.

CI (``CI=true``, as GitHub Actions and most runners set it) runs as root with apt, a
compiler and the package index, so every test there can run: a skip caused by a failed
build, a missing package, no root or no apt, or ``DLM_SKIP_LLAMA_CPP_BUILD`` means the
setup broke, and is reported as a failure. The one legitimate skip is a GPU test on a
machine without a GPU (tests marked ``gpu``). Outside CI skips stay skips, so a laptop
without root or a compiler still runs the rest of the suite.

Loaded by tests/conftest.py; tests/unit/test_ci_strict.py runs it on a throwaway suite.
"""
from __future__ import annotations

import os

import pytest


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
    if not (rep.skipped and ci_strict()) or hasattr(rep, "wasxfail") or item.get_closest_marker("gpu") is not None:
        return
    rep.outcome = "failed"
    rep.longrepr = (f"skipped under CI=true, where a skip means a broken setup (only tests marked 'gpu' may skip): "
                    f"{_reason(rep.longrepr)}")
