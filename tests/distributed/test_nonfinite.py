"""Non-finite losses and gradients under every engine: each such step is skipped on all ranks
(weights unchanged, training goes on) or, where the engine cannot skip (a non-finite loss
under ZeRO-3), the run stops with one message and the last checkpoint intact.

One torchrun launch on 2 processes runs every case (tests/distributed/run_nonfinite.py); each
saves after every good step (train.save_interval=1) and at the end, so "skipped" is checked
exactly: the weights after the poisoned last step(s) equal those of the last good step, and
those after each good step differ from those before it (before step 0: the initial weights,
drawn again from the run's config).
The "last rank" cases make only the last data-parallel rank's loss value non-finite, with a
finite gradient: no other rank sees anything wrong in its own losses or gradients, so only
the ranks' agreement on the flag (comm.any_flag) makes them skip too. The single-process
ZeRO-0 path (and max_bad_steps) is tested through the CLI in tests/e2e/test_cli.py.
"""
import pytest
import torch

from common import metrics, torchrun

from dlm_megatron.checkpoint import latest_checkpoint, load_full_state_dict

pytestmark = pytest.mark.distributed

STEPS = 3
SAVE = f"train.steps={STEPS},train.save_interval=1,train.keep_last=10,train.max_bad_steps=3"
# name: (loss poisoned at on every rank, gradient poisoned at (finite loss), loss value poisoned
# at on the last data-parallel rank only, layout); steps are 0-based
CASES = {
    "pp2_megatron": ("1", "2", "-", "parallel.pp=2,parallel.zero_stage=1"),
    "pp2_megatron_last_rank": ("-", "-", "2", "parallel.pp=2,parallel.zero_stage=1"),  # the last stage's loss
    "dp2_megatron_last_rank": ("-", "-", "2", "parallel.engine=megatron,parallel.zero_stage=1"),
    "dp2_zero0": ("-", "2", "-", "parallel.zero_stage=0"),
    "dp2_zero0_last_rank": ("-", "-", "2", "parallel.zero_stage=0"),
    "dp2_zero1": ("1", "2", "-", "parallel.zero_stage=1"),
    "dp2_zero1_last_rank": ("-", "-", "2", "parallel.zero_stage=1"),
    "dp2_zero2": ("1", "2", "-", "parallel.zero_stage=2"),
    "dp2_zero3": ("-", "2", "-", "parallel.zero_stage=3"),
    "dp2_zero3_nan_loss": ("1", "-", "-", "parallel.zero_stage=3"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    # ~30 s normally; ranks that disagree on a skip hang in their next collective, so fail sooner
    torchrun(2, "tests/distributed/run_nonfinite.py", str(root),
             *[f"{k}:{loss}:{grad}:{last}:{SAVE},{layout}" for k, (loss, grad, last, layout) in CASES.items()], timeout=300)
    return root


def _weights(run_dir, step):
    return load_full_state_dict(run_dir / "checkpoints" / f"step_{step:06d}")


def _init_weights(run_dir, like):
    """The weights before step 0: the pure function of (seed, canonical name) the run drew."""
    from dlm_megatron.config import load_config
    from dlm_megatron.model.sharding import init_full

    cfg = load_config(str(run_dir / "config.yaml"), [])
    return {k: init_full(k, tuple(v.shape), seed=cfg.train.seed, std=cfg.model.init_method_std,
                         num_layers=cfg.model.num_layers) for k, v in like.items()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [k for k in CASES if k != "dp2_zero3_nan_loss"])
def test_non_finite_steps_are_skipped_on_every_rank(runs, name):
    run_dir = runs / name
    assert not (run_dir / "stopped.txt").exists(), (run_dir / "stopped.txt").read_text()
    poisoned = {int(s) for s in ",".join(CASES[name][:3]).split(",") if s != "-"}
    logged = [r["step"] for r in metrics(run_dir) if r.get("split") != "val"]
    assert logged == [s + 1 for s in range(STEPS) if s not in poisoned], logged
    rows = [r for r in metrics(run_dir) if r.get("split") != "val"]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows), rows
    # A skipped step saves nothing; the save at the end of the run follows the last step, which
    # every case poisons, so trailing skipped steps are compared exactly with the last good one.
    assert STEPS - 1 in poisoned
    prev = None
    for s in range(STEPS):
        path = run_dir / "checkpoints" / f"step_{s + 1:06d}"
        if s in poisoned:
            if path.exists():
                assert _same(_weights(run_dir, s + 1), prev), f"{name}: skipped step {s} changed the weights"
            continue
        w = _weights(run_dir, s + 1)
        prev = _init_weights(run_dir, w) if prev is None else prev
        assert not _same(w, prev), f"{name}: good step {s} did not train"
        prev = w
    assert all(torch.isfinite(v).all() for v in prev.values())


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
