"""Background checkpoint saves cannot corrupt a run (issue 12 item 3).

A process is killed with SIGKILL (``DLM_TEST_KILL_SAVE``, checkpoint.kill_point) at each
moment of a save: after staging (no file written), with a file half written, with every
file written and fsynced but nothing committed, and with the folder renamed into place but
``latest`` not yet moved. Each time the previous checkpoint must be intact (equal to the
uninterrupted run's), ``latest`` must name a complete checkpoint, and the next start must
clean up what the save left; the last rerun ends at the uninterrupted run's loss and weights.
With two ranks, one rank dying while writing must keep rank 0 from committing the step.
"""
import signal

import pytest

from common import COMMON_OVERRIDES, PY, env, run, train_losses

from dlm_megatron.checkpoint import load_full_state_dict

pytestmark = pytest.mark.e2e

# ZeRO-1 (DeepSpeed's partitioned optimizer, the project's own state format), saving every
# 2 steps; adam_eps as in tests/distributed (Adam continuous near zero gradients) so the
# two-rank run can be compared with the one-rank reference within float tolerance.
ARGS = list(COMMON_OVERRIDES) + ["train.steps=8", "train.save_interval=2", "train.keep_last=10", "parallel.zero_stage=1",
                                 "train.adam_eps=1e-5"]
TRAIN = [PY, "-m", "dlm_megatron.train", "configs/tiny.yaml"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("async_save") / "ref"
    run(TRAIN + ARGS + [f"train.output_dir={out}"])
    return out


def _state(run_dir, step):
    return load_full_state_dict(run_dir / "checkpoints" / f"step_{step:06d}")


def _same(a, b):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def _latest(run_dir):
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def test_sigkill_at_every_moment_of_a_save_keeps_the_previous_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    cmd = TRAIN + ARGS + [f"train.output_dir={out}"]
    root = out / "checkpoints"
    # (kill at, checkpoint latest must name afterwards, leftover the next start must report)
    plan = [("staged@4", 2, None),
            ("writing@4", 2, ".tmp-step_000004"),
            ("written@6", 4, ".tmp-step_000004"),
            ("renamed@6", 4, ".tmp-step_000006")]
    for kill, latest, leftover in plan:
        p = run(cmd, env=env(DLM_TEST_KILL_SAVE=kill), check=False)
        assert p.returncode == -signal.SIGKILL, (kill, p.returncode, p.stderr[-2000:])
        assert _latest(out) == f"step_{latest:06d}", kill
        _same(_state(out, latest), _state(reference, latest))  # intact: what the uninterrupted run saved
        if leftover is not None:
            assert f"cleaned up {leftover} left by an interrupted save" in p.stdout, (kill, p.stdout[-2000:])
        phase, step = kill.split("@")
        tmp = root / f".tmp-step_{int(step):06d}"
        if phase == "renamed":  # complete and in place, but not named by latest
            assert not tmp.exists() and (root / f"step_{int(step):06d}" / "meta.json").is_file()
        else:
            assert tmp.is_dir() and not (tmp / "meta.json").exists() and not (root / f"step_{int(step):06d}").exists()
        if phase == "writing":  # the model shard was cut short
            (shard,) = (tmp / "model").glob("*.safetensors")
            assert shard.stat().st_size < (reference / "checkpoints" / "step_000004" / "model" / shard.name).stat().st_size
    p = run(cmd)
    assert "resumed from" in p.stdout and "step_000004" in p.stdout, p.stdout[-2000:]
    assert _latest(out) == "step_000008"
    assert sorted(x.name for x in root.iterdir() if x.name.startswith(".")) == []
    assert train_losses(out)[-1] == pytest.approx(train_losses(reference)[-1], abs=1e-6)
    _same(_state(out, 8), _state(reference, 8))
    _same(_state(out, 6), _state(reference, 6))  # the re-saved step 6 replaced the one left unnamed


def test_a_rank_dying_while_writing_keeps_rank0_from_committing(reference, tmp_path):
    """Rank 1 of 2 is killed with its first file half written; rank 0 has written all of its
    files by then, but the step is never committed. The rerun (at dp=1: ZeRO-1 state
    resumes at another DP size) continues from the previous checkpoint to the reference's
    final loss within float tolerance."""
    out = tmp_path / "run"
    args = ARGS + [f"train.output_dir={out}"]
    p = run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlm_megatron.train",
             "configs/tiny.yaml", *args], env=env(DLM_TEST_KILL_SAVE="writing@4@1"), check=False, timeout=600)
    assert p.returncode != 0
    root = out / "checkpoints"
    assert _latest(out) == "step_000002"
    assert not (root / "step_000004").exists()
    assert (root / ".tmp-step_000004" / "model" / "tp0_pp0.safetensors").is_file()  # rank 0's part was written
    p = run(TRAIN + args)
    assert "cleaned up .tmp-step_000004 left by an interrupted save" in p.stdout
    assert "resumed from" in p.stdout and "step_000002" in p.stdout
    assert _latest(out) == "step_000008"
    losses, ref = train_losses(out), train_losses(reference)
    assert losses[-6:] == pytest.approx(ref[-6:], abs=2e-5)
