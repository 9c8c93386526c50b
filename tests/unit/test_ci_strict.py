"""CI=true turns skips into failures, except GPU tests skipped for want of a GPU
(tests/ci_strict.py), and the suite's own setup skips (llama.cpp build, Slurm install) are
skips that this rule catches. .ci/run sets CI=true itself."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

SUITE = '''
import pytest

@pytest.fixture
def cluster():
    pytest.skip("slurm is not installed and apt-get is not available")

def test_build_failed():
    pytest.skip("building llama-cpp-python failed")

def test_fixture_skip(cluster):
    pass

@pytest.mark.skipif(True, reason="static skip")
def test_static_skip():
    pass

@pytest.mark.gpu
def test_no_gpu():
    pytest.skip("needs CUDA")

@pytest.mark.gpu
def test_too_few_gpus():
    pytest.skip("sequence parallel needs TP>=2, i.e. two GPUs")

@pytest.mark.gpu
def test_gpu_missing_package():
    pytest.importorskip("transformer_engine_not_here", reason="Transformer Engine not installed")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

def test_pass():
    pass
'''


def _outcomes(tmp_path: Path, ci: str | None) -> dict[str, str]:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from ci_strict import pytest_runtest_makereport  # noqa: F401

        def pytest_configure(config):
            config.addinivalue_line("markers", "gpu: needs CUDA")
    '''))
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_suite.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    got = {}
    for line in p.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL") and "::" in parts[1]:
            got[parts[1].split("::")[1]] = parts[0]
    got["_stdout"] = p.stdout
    return got


def test_ci_true_fails_setup_skips_but_not_gpu_skips(tmp_path):
    ci = _outcomes(tmp_path, "true")
    assert ci.get("test_build_failed") == "FAILED", ci["_stdout"]
    for name in ("test_fixture_skip", "test_static_skip"):  # skipped while setting up: an error
        assert ci.get(name) == "ERROR", ci["_stdout"]
    assert "skipped under CI=true" in ci["_stdout"] and "building llama-cpp-python failed" in ci["_stdout"]
    assert ci.get("test_pass") == "PASSED" and ci.get("test_xfail") == "XFAIL", ci["_stdout"]
    assert "test_no_gpu" not in ci and "needs CUDA" in ci["_stdout"]  # a GPU skip stays a skip
    assert "test_too_few_gpus" not in ci and "two GPUs" in ci["_stdout"]  # so does one for want of GPUs
    # a GPU test skipped for another reason (a package missing on a GPU runner) is a broken setup
    assert ci.get("test_gpu_missing_package") == "FAILED" and "Transformer Engine not installed" in ci["_stdout"], ci["_stdout"]


def test_outside_ci_skips_stay_skips(tmp_path):
    local = _outcomes(tmp_path, None)
    assert "FAILED" not in local.values() and "ERROR" not in local.values(), local["_stdout"]
    assert "6 skipped" in local["_stdout"] and "1 passed" in local["_stdout"], local["_stdout"]


def test_llama_cpp_setup_problems_are_skips_that_ci_fails(monkeypatch, tmp_path):
    """The llama.cpp tier reports 'no wheel and DLM_SKIP_LLAMA_CPP_BUILD' and 'no compiler'
    as skips (so ci_strict fails them under CI) instead of silently passing."""
    sys.path.insert(0, str(TESTS / "e2e"))
    import test_gguf_llamacpp as g

    monkeypatch.setattr(g, "_importable", lambda: False)
    monkeypatch.setattr(g, "WHEEL_DIR", tmp_path)
    monkeypatch.setenv("DLM_SKIP_LLAMA_CPP_BUILD", "1")
    with pytest.raises(pytest.skip.Exception, match="DLM_SKIP_LLAMA_CPP_BUILD"):
        g.ensure_llama_cpp(None)
    monkeypatch.delenv("DLM_SKIP_LLAMA_CPP_BUILD")
    monkeypatch.setattr(g.shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ compiler"):
        g.ensure_llama_cpp(None)


def test_slurm_setup_problems_are_skips_that_ci_fails(monkeypatch):
    """Not root (or no apt) while Slurm is missing: the cluster fixture skips with the reason."""
    sys.path.insert(0, str(TESTS / "slurm"))
    import cluster as c

    monkeypatch.setattr(c, "_missing_binaries", lambda: ["slurmctld"])
    monkeypatch.setattr(c.os, "geteuid", lambda: 1000)
    gen = c.slurm_cluster_fixture()
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        next(gen)


def test_ci_entry_point_sets_strict_mode():
    """.ci/run exports CI=true unless the runner set it, so strict mode never depends on it."""
    text = (TESTS.parent / ".ci" / "run").read_text()
    assert 'export CI="${CI:-true}"' in text and text.index("export CI=") < text.index("exec bash tests/run.sh")
