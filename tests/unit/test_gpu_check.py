"""tools/gpu_check.sh --dry-run on CPU: every stage's command line, config overrides and files
are checked here, so a renamed flag or key fails this suite instead of a rare GPU session."""
import subprocess

from common import PY, REPO, env


def dry_run(tmp_path, *args):
    return subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(tmp_path), *args], cwd=REPO,
                          env=env(PYTHON=PY), capture_output=True, text=True, timeout=600)


def test_every_stage_passes_its_dry_run(tmp_path):
    p = dry_run(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    rows = [line.split("|")[1:4] for line in summary.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    stages = {(n.strip(), name.strip()): rc.strip() for n, name, rc in rows}
    assert {n for n, _ in stages} == {"0", "1", "2", "3", "4"}, summary
    assert all(rc == "0" for rc in stages.values()), summary
    assert len([k for k in stages if k[0] == "4"]) == 3  # the three MFU runs
    logs = {n: (tmp_path / f"stage{n}.log").read_text() for n in "01234"}
    assert "mcore 0.16.1" in logs["0"] and "deepspeed 0.19.8" in logs["0"]
    assert "gpu_kernels dry run" in logs["1"] and "tests/gpu/test_gpu.py" in logs["2"]
    # the dry run executed the GPU run's own command lines (plus --dry-run / --collect-only)
    assert "gpu_kernels.py --repeats 8 --out" in logs["1"] and "gpu_slices.py --steps 3 --out" in logs["3"]
    assert "-m gpu -n 10 --timeout 140 -rA tests/gpu --collect-only" in logs["2"]
    assert "prepare_builtin_corpus" in logs["0"] and "shakespeare" in logs["0"]
    assert logs["4"].count("config OK") == 3


def test_a_bad_override_fails_the_dry_run(tmp_path):
    """The MFU stage's overrides go through the real config loader: a misspelt key fails."""
    p = subprocess.run([PY, "benchmarks/bench_mfu.py", "--dry-run", "--config", "configs/1b.yaml",
                        "model.attention_backnd=sdpa"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "unknown config key 'model.attention_backnd'" in p.stderr


def test_bad_arguments_are_one_line(tmp_path):
    for args, needle in ((["--stages", "7"],  "--stages takes numbers 0-4"), (["--bogus"], "unknown argument '--bogus'")):
        p = dry_run(tmp_path, *args)
        assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and needle in p.stderr, p.stderr


def test_stage_selection(tmp_path):
    p = dry_run(tmp_path, "--stages", "3")
    assert p.returncode == 0, p.stdout[-2000:]
    assert "gpu_slices dry run" in p.stdout and "stage 1" not in p.stdout


def _gpu_test_overrides() -> list[tuple[int, str, str | None]]:
    """(line, dotted key, literal value or None) of every ``key=value`` string in
    tests/gpu/test_gpu.py, f-strings included (their key part is literal)."""
    import ast
    import re
    from pathlib import Path

    tree = ast.parse((Path(REPO) / "tests/gpu/test_gpu.py").read_text())
    found = []
    in_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstring:
            m = re.fullmatch(r"([a-z_]+\.[a-z_.]+)=(.*)", node.value)
            if m:
                found.append((node.lineno, m[1], m[2]))
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            m = re.fullmatch(r"([a-z_]+\.[a-z_.]+)=(.*)", str(node.values[0].value))
            if m:
                found.append((node.lineno, m[1], None))
    return found


def test_gpu_tests_pass_only_existing_config_keys():
    """The CUDA tests run only on a lent GPU and their --collect-only dry run does not execute
    them: every config key they pass (and every literal value) must load on CPU here."""
    from dlm_megatron.config import load_config

    found = _gpu_test_overrides()
    assert len(found) > 20 and any(k == "parallel.engine" for _, k, _ in found), found
    bad = []
    for line, key, value in found:
        if value is None:  # an f-string: the key must exist, whatever the value
            try:
                load_config(f"{REPO}/configs/tiny.yaml", [f"{key}=null"])
            except Exception as e:  # a bad value is fine here; an unknown key is not
                if "unknown config key" in str(e):
                    bad.append((line, key, str(e)))
        else:
            try:
                load_config(f"{REPO}/configs/tiny.yaml", [f"{key}={value}"])
            except Exception as e:
                bad.append((line, f"{key}={value}", str(e)))
    assert not bad, bad
