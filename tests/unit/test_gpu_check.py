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
