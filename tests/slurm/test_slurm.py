"""launch/slurm.sh on a real two-node Slurm cluster brought up on this host (cluster.py).

(a) ``sbatch --wait -N 2 --ntasks-per-node=1 launch/slurm.sh`` with NPROC_PER_NODE=2: four
    ranks (tp=2 x dp=2) across the two nodes train to the end; metrics.jsonl has one row per
    step, the final checkpoint exists, the log shows global ranks 0-3 of world size 4.
(b) Preemption: the same run is sent SIGUSR1 on its batch shell mid-training (as
    ``--signal=B:USR1@N`` would); the trainer checkpoints, the job requeues itself
    (SLURM_RESTART_COUNT=1), resumes and completes; every logged loss and the final weights
    equal run (a)'s, which serves as the uninterrupted reference.
Root only (installs Slurm with apt when missing; skips only when that is impossible).
Runtime ~3 min on an idle 2-core machine: ~75 % of it is 4 + 4 + 4 trainer start-ups.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import slurm_cluster  # noqa: E402,F401  (module-scoped fixture)

from common import COMMON_OVERRIDES, REPO  # noqa: E402

pytestmark = pytest.mark.slurm

STEPS = 40
SIGNAL_AFTER_ROWS = 3
OVERRIDES = (*COMMON_OVERRIDES, "parallel.tp=2", "logging.log_interval=1", f"train.steps={STEPS}")


def job_env(cluster) -> dict:
    return cluster.env(NPROC_PER_NODE=2, OMP_NUM_THREADS=1, LOGLEVEL="INFO", PYTHONWARNINGS="ignore",
                       WANDB_SILENT="true")


def sbatch_cmd(log_dir: Path, out_dir: Path, name: str) -> list[str]:
    return ["sbatch", "--wait", "-N", "2", "--ntasks-per-node=1", f"--job-name={name}",
            f"--output={log_dir}/%x-%j.out", "launch/slurm.sh", "configs/tiny.yaml",
            *OVERRIDES, f"train.output_dir={out_dir}"]


def job_id(sbatch_stdout: str) -> str:
    m = re.search(r"Submitted batch job (\d+)", sbatch_stdout)
    assert m, sbatch_stdout
    return m.group(1)


def train_rows(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") != "val"]


def describe_failure(cluster, log: Path | None, what: str) -> str:
    text = log.read_text(errors="replace")[-6000:] if log and log.exists() else "(no job log)"
    return f"{what}\n--- job log (tail)\n{text}\n--- cluster logs\n{cluster.logs(15)}"


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory):
    """Run (a): returns (output dir, job log)."""
    base = tmp_path_factory.mktemp("slurm_full")
    out, logs = base / "run", base / "logs"
    logs.mkdir()
    p = subprocess.run(sbatch_cmd(logs, out, "dlm-full"), cwd=REPO, env=job_env(slurm_cluster),
                       capture_output=True, text=True, timeout=900)
    log = logs / f"dlm-full-{job_id(p.stdout)}.out"
    assert p.returncode == 0, describe_failure(slurm_cluster, log, f"sbatch --wait exited {p.returncode}: {p.stderr}")
    return out, log


def test_two_nodes_four_ranks(slurm_cluster, uninterrupted):
    out, log = uninterrupted
    text = log.read_text(errors="replace")
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), describe_failure(slurm_cluster, log, "metrics rows")
    assert all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    ckpt = out / "checkpoints" / f"step_{STEPS:06d}"
    assert sorted(p.name for p in (ckpt / "model").glob("*.safetensors")) == ["tp0_pp0.safetensors", "tp1_pp0.safetensors"]
    assert (out / "checkpoints" / "latest").exists()
    # the launcher's view, both nodes' torchrun, torchrun's rendezvous, the trainer's layout
    assert "SLURM_RESTART_COUNT=0" in text and "world_size=4" in text, text[-3000:]
    for node in ("node1", "node2"):
        assert re.search(rf"\[slurm.sh node {node} SLURM_NODEID=\d\] torchrun --nnodes=2 --nproc_per_node=2", text), text[-3000:]
    ranks = set()
    for m in re.finditer(r"global_ranks=\[([\d, ]+)\]", text):
        ranks |= {int(x) for x in m.group(1).split(",")}
    assert ranks == {0, 1, 2, 3}, text[-3000:]
    assert "global_world_sizes=[4, 4]" in text
    assert "layout tp=2 pp=1 dp=2" in text
    assert "training finished" in text and "requeue" not in text


def test_preempt_requeue_resume_exact(slurm_cluster, uninterrupted, tmp_path):
    from safetensors.numpy import load_file

    ref_out, _ = uninterrupted
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    sb = subprocess.Popen(sbatch_cmd(logs, out, "dlm-preempt"), cwd=REPO, env=job_env(slurm_cluster),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = None
    try:
        # sbatch --wait waits (through the requeue) for the end; its stdout is block-buffered
        deadline = time.time() + 400
        jid = ""
        while not jid:
            assert sb.poll() is None and time.time() < deadline, describe_failure(slurm_cluster, None, f"sbatch: {sb.communicate()}")
            jid = slurm_cluster.run("squeue", "-h", "-n", "dlm-preempt", "-o", "%i", check=False).stdout.strip()
            time.sleep(0.2)
        log = logs / f"dlm-preempt-{jid}.out"
        while len(train_rows(out)) < SIGNAL_AFTER_ROWS:
            assert sb.poll() is None, describe_failure(slurm_cluster, log, "job ended before it could be signalled")
            assert time.time() < deadline, describe_failure(slurm_cluster, log, "no training progress")
            time.sleep(0.2)
        # what --signal=B:USR1@N does at the time limit, delivered now
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", jid)
        _, err = sb.communicate(timeout=600)
    finally:
        if sb.poll() is None:
            sb.kill()
            sb.wait()
    assert sb.returncode == 0, describe_failure(slurm_cluster, log, f"sbatch --wait exited {sb.returncode}: {err}")
    text = log.read_text(errors="replace")
    m = re.search(r"checkpoint saved at step (\d+), exiting for requeue", text)
    assert m, describe_failure(slurm_cluster, log, "the trainer did not report a preemption checkpoint")
    stop_step = int(m.group(1))
    assert SIGNAL_AFTER_ROWS <= stop_step < STEPS
    assert "received SIGUSR1" in text and "requeueing job" in text
    assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" in text
    second = text.split("SLURM_RESTART_COUNT=1", 1)[1]
    assert f"checkpoints/step_{stop_step:06d} at step {stop_step}" in second  # "resumed from ... at step k"
    assert "training finished" in second and "training finished" not in text.split("SLURM_RESTART_COUNT=1", 1)[0]

    rows, ref = train_rows(out), train_rows(ref_out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # bit-exact resume
    final = f"step_{STEPS:06d}"
    for shard in ("tp0_pp0.safetensors", "tp1_pp0.safetensors"):
        a = load_file(str(out / "checkpoints" / final / "model" / shard))
        b = load_file(str(ref_out / "checkpoints" / final / "model" / shard))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), f"{shard}:{k} differs after preemption + resume"


def test_slurm_8b_submit_mode_dry_run(tmp_path):
    """bash launch/slurm_8b.sh submits itself with the layout from the environment."""
    env = dict(os.environ, DLM_DRY_RUN="1", NODES="16", TIME="48:00:00", PARTITION="gpu", ACCOUNT="proj",
               SBATCH_EXTRA="--qos=high --mail-type=END")
    env.pop("SLURM_JOB_ID", None)
    p = subprocess.run(["bash", f"{REPO}/launch/slurm_8b.sh", "train.output_dir=runs/x"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    assert words[0] == "sbatch" and words[-2].endswith("launch/slurm_8b.sh") and words[-1] == "train.output_dir=runs/x"
    for opt in ("--nodes=16", "--time=48:00:00", "--partition=gpu", "--account=proj", "--qos=high", "--mail-type=END"):
        assert opt in words, p.stdout
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing
    for script in ("launch/slurm.sh", "launch/slurm_8b.sh"):
        assert subprocess.run(["bash", "-n", f"{REPO}/{script}"]).returncode == 0
    # outside a job, slurm.sh explains itself instead of running
    q = subprocess.run(["bash", f"{REPO}/launch/slurm.sh", "configs/tiny.yaml"], env={k: v for k, v in os.environ.items()
                       if not k.startswith("SLURM_")}, capture_output=True, text=True, timeout=30)
    assert q.returncode == 2 and "usage: sbatch" in q.stderr
