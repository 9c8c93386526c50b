"""Data never stalls a step: the next steps' batches are read and noised in a background
thread (data/prefetch.py) while a step runs, and they are exactly the batches the loop
would have built itself, from any start step (resume).

The trainer is driven in one process with the engine replaced by a recorder whose step
takes a fixed time, and the reader slowed by sleeping in PackedDataset.__getitem__.
"""
from __future__ import annotations

import statistics
import threading
import time

import pytest
import torch

from common import COMMON_OVERRIDES, REPO, RecordingEngine

from dlm_megatron.data.prefetch import Prefetcher

STEP_SECONDS = 0.3
READ_SECONDS = 0.3  # per step: spread over the global batch's 8 samples


def test_prefetcher_order_depth_errors_and_close():
    made, started = [], threading.Event()

    def produce(step):
        made.append(step)
        started.set()
        if step == 6:
            raise ValueError("bad shard at step 6")
        return step * 10

    p = Prefetcher(produce, 2, 9, depth=2)
    started.wait(5)
    time.sleep(0.3)
    assert made == [2, 3, 4]  # two queued, one produced and waiting for room
    assert [p.get(s) for s in (2, 3, 4, 5)] == [20, 30, 40, 50]
    with pytest.raises(RuntimeError, match="asked for step 7, next is 6"):
        p.get(7)
    with pytest.raises(ValueError, match="bad shard at step 6"):
        p.get(6)
    p.close()
    sync = Prefetcher(produce, 0, 3, depth=0)  # depth 0: produced on demand, in this thread
    assert sync.get(0) == 0 and made[-1] == 0


def _train(tmp_path, monkeypatch, prefetch: int, start_step: int = 0, steps: int = 6) -> RecordingEngine:
    from dlm_megatron import train
    from dlm_megatron.config import load_config
    from dlm_megatron.data.loader import PackedDataset

    engines = []
    real_getitem = PackedDataset.__getitem__

    def slow_getitem(self, i):
        time.sleep(READ_SECONDS / 8)
        return real_getitem(self, i)

    monkeypatch.setattr(PackedDataset, "__getitem__", slow_getitem)
    monkeypatch.setattr(train, "build_engine", lambda model, cfg, lay, bf16: engines.append(RecordingEngine(model, STEP_SECONDS)) or engines[-1])
    monkeypatch.setattr(train.Trainer, "_resume", lambda self, latest: start_step)
    cfg = load_config(f"{REPO}/configs/tiny.yaml", list(COMMON_OVERRIDES) + [
        f"train.steps={steps}", "train.save_at_end=false", "data.val_path=null", "logging.log_interval=100",
        f"data.prefetch={prefetch}", f"train.output_dir={tmp_path / f'p{prefetch}_s{start_step}'}"])
    train.run(cfg)
    monkeypatch.undo()
    return engines[0]


def test_slow_reader_is_hidden_and_batches_are_unchanged(tmp_path, monkeypatch):
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    inline = _train(tmp_path, monkeypatch, prefetch=0)
    ahead = _train(tmp_path, monkeypatch, prefetch=2)
    resumed = _train(tmp_path, monkeypatch, prefetch=2, start_step=3)
    # the interval between step starts: read + step inline, only the step when prefetched
    gap_inline = statistics.median(b - a for a, b in zip(inline.times, inline.times[1:]))
    gap_ahead = statistics.median(b - a for a, b in zip(ahead.times, ahead.times[1:]))
    assert gap_inline > STEP_SECONDS + 0.8 * READ_SECONDS, gap_inline
    assert gap_ahead < STEP_SECONDS + 0.3 * READ_SECONDS, (gap_ahead, gap_inline)
    # the same batches, step for step, from the start and from a resumed step
    assert len(inline.steps) == len(ahead.steps) == 6 and len(resumed.steps) == 3
    for a, b in zip(inline.steps, ahead.steps):
        for name in ("tokens_BS", "labels_BS", "loss_weight_BS", "t_B"):
            assert all(torch.equal(getattr(x, name), getattr(y, name)) for x, y in zip(a, b)), name
    for a, b in zip(inline.steps[3:], resumed.steps):
        assert all(torch.equal(x.tokens_BS, y.tokens_BS) and torch.equal(x.t_B, y.t_B) for x, y in zip(a, b))
