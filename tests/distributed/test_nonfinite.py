"""Non-finite losses and gradients under every engine: each such step is skipped on all ranks
(weights unchanged, training goes on) or, where the engine cannot skip (a non-finite loss
under ZeRO-3), the run stops with one message and the last checkpoint intact.

One torchrun launch on 2 processes runs every case (tests/distributed/run_nonfinite.py); each
saves after every step (train.save_interval=1), so "skipped" is checked exactly: the weights
after the poisoned last step(s) equal the checkpoint before them. The single-process ZeRO-0
path (and max_bad_steps) is tested through the CLI in tests/e2e/test_cli.py.
"""
import pytest
import torch

from common import metrics, torchrun

from dlm_megatron.checkpoint import latest_checkpoint, load_full_state_dict

pytestmark = pytest.mark.distributed

SAVE = "train.steps=3,train.save_interval=1,train.keep_last=10,train.max_bad_steps=3"
# name: (loss poisoned at, gradient poisoned at (finite loss), layout); steps are 0-based
CASES = {
    "pp2_megatron": ("1", "2", "parallel.pp=2,parallel.zero_stage=1"),
    "dp2_zero0": ("-", "2", "parallel.zero_stage=0"),
    "dp2_zero1": ("-", "2", "parallel.zero_stage=1"),
    "dp2_zero3": ("-", "2", "parallel.zero_stage=3"),
    "dp2_zero3_nan_loss": ("1", "-", "parallel.zero_stage=3"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    torchrun(2, "tests/distributed/run_nonfinite.py", str(root),
             *[f"{k}:{loss}:{grad}:{SAVE},{layout}" for k, (loss, grad, layout) in CASES.items()])
    return root


def _weights(run_dir, step):
    return load_full_state_dict(run_dir / "checkpoints" / f"step_{step:06d}")


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [k for k in CASES if k != "dp2_zero3_nan_loss"])
def test_non_finite_steps_are_skipped_on_every_rank(runs, name):
    loss_at, grad_at, _ = CASES[name]
    run_dir = runs / name
    assert not (run_dir / "stopped.txt").exists(), (run_dir / "stopped.txt").read_text()
    poisoned = {int(s) for s in (loss_at + "," + grad_at).split(",") if s != "-"}
    logged = [r["step"] for r in metrics(run_dir) if r.get("split") != "val"]
    assert logged == [s + 1 for s in range(3) if s not in poisoned], logged
    rows = [r for r in metrics(run_dir) if r.get("split") != "val"]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows), rows
    last_good = max(s + 1 for s in range(3) if s not in poisoned)
    final = _weights(run_dir, 3)  # saved at the end, after the poisoned step(s)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert _same(final, _weights(run_dir, last_good)), f"{name}: a skipped step changed the weights"
    assert not _same(final, _weights(run_dir, 1)) or last_good == 1  # and the good steps did train


def test_non_finite_loss_under_zero3_stops_with_checkpoint_intact(runs):
    """ZeRO-3 cannot skip an update after a NaN loss (no exact zero from partitioned
    parameters): the run stops before applying it, with one message, on every rank."""
    run_dir = runs / "dp2_zero3_nan_loss"
    msg = (run_dir / "stopped.txt").read_text()
    assert "non-finite loss under parallel.zero_stage=3, which cannot skip an update" in msg and "\n" not in msg
    assert latest_checkpoint(run_dir).name == "step_000001"
    assert not (run_dir / "checkpoints" / "step_000002").exists()
    w = _weights(run_dir, 1)
    assert all(torch.isfinite(v).all() for v in w.values())
