"""Helpers shared by the test tiers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
PY = sys.executable

# A small, fast variant of the tiny config used by the distributed and end-to-end tests.
COMMON_OVERRIDES = (
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=192",
    "data.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.lr=1e-2",
    "train.save_interval=0",
    "train.eval_interval=0",
    "train.eval_batches=1",
    "train.sample_at_end=false",
    "logging.wandb=disabled",
    "logging.log_interval=1",
    "diffusion.random_length_prob=0.0",
    f"data.cache_dir={REPO}/.cache/data",
)


def env(**extra) -> dict:
    e = dict(os.environ)
    # In-process model builds (single-process init) set these in pytest's own environment;
    # a subprocess inheriting them would try to join pytest's rendezvous port.
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_SILENT": "true"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def _kill_tree(pid: int) -> None:
    """Kill a process and all its descendants. torchrun starts each worker in a session of its
    own, so killing the launcher (or its process group) would leave hung workers behind."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run(cmd, timeout=900, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=REPO, env=kw.pop("env", env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n--- stdout\n{out[-4000:]}\n"
                             f"--- stderr\n{err[-4000:]}") from None
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def torchrun(nproc: int, script: str, *args, timeout=900) -> subprocess.CompletedProcess:
    return run([PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args], timeout=timeout)


def metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if r.get("split") != "val"]


def train_grad_norms(run_dir) -> list[float]:
    """The logged pre-clip global gradient norm of each training step."""
    return [r["grad_norm"] for r in metrics(run_dir) if r.get("split") != "val"]


# Pre-clip gradient norms of a layout against its plain reference's, computed in float64 (the
# exact value of its fp32 gradients). fp32 norms of the same gradients differ by up to 2e-4
# relative with the order of accumulation over the ~1.1M coordinates (measured on the
# reference's step-1 gradients: one fp32 reduction 2.55106, per tensor then over tensors
# 2.55140, float64 2.55156), and the engines each use their own order; the layouts' measured
# spread is 2.0e-4 at most (sft_dp2_zero1). A scale bug (a DP sum instead of a mean, a
# missing 1/accumulation, a doubled reduction) moves the norm by a factor sqrt(2) or more.
GRAD_NORM_RTOL = 5e-4


def global_norm_f64(model) -> float:
    """The global L2 norm of the model's gradients, accumulated in float64."""
    import torch

    return torch.cat([p.grad.double().reshape(-1) for p in model.parameters() if p.grad is not None]).norm().item()


def assert_grad_norms_match(name: str, got: list[float], ref: list[float], rtol: float = GRAD_NORM_RTOL) -> None:
    assert len(got) == len(ref), (name, got, ref)
    for step, (a, b) in enumerate(zip(got, ref), 1):
        assert abs(a - b) <= rtol * abs(b), f"{name}: step {step} grad_norm {a} != reference {b} (rel {abs(a - b) / abs(b):.1e})"


class RecordingEngine:
    """Stands in for the training engine in tests that drive ``train.run`` in one process:
    records each train_step's micro-batches and when it started; a step takes
    ``step_seconds`` (0: returns at once). Its losses are zeros."""

    def __init__(self, model, step_seconds: float = 0.0):
        self.module = model
        self.step_seconds = step_seconds
        self.steps: list[list] = []
        self.times: list[float] = []

    def set_lr(self, step):
        return 1e-3

    def train(self):
        pass

    def eval(self):
        pass

    def train_step(self, micro_batches, loss_fn, **_):
        import time

        import torch

        self.times.append(time.perf_counter())
        self.steps.append(micro_batches)
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return [torch.zeros(()) for _ in micro_batches], 0.0, False
