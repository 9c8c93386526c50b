"""Background saves (saving.py) without a model: the streaming safetensors writer, host
staging buffers, and the writer/commit protocol in one process (the training loop's
all-reduce reduces to the local flags). Killing a real run mid-save: tests/e2e/test_async_save.py."""
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dlm_megatron import checkpoint as ckpt
from dlm_megatron.saving import AsyncSaver, HostStaging, StagedFile, write_safetensors


def test_streamed_safetensors_read_back_exactly(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.randn(5),
               "empty": torch.zeros(0, 4), "i": torch.tensor([1, -2], dtype=torch.int64)}
    seen = []
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "f", "adam_step": "3"}, after_tensor=seen.append)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype
                                                  for k in tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "f", "adam_step": "3"}
    assert seen == [0, 1, 2, 3]


def test_host_staging_is_a_snapshot_in_buffers_reused_from_save_to_save():
    st, w = HostStaging(), torch.ones(4)
    st.begin()
    a = st.copy("w", w)
    st.copy("gone", torch.zeros(2))
    st.done()
    w.add_(1)  # the next optimizer step does not touch the staged copy
    assert torch.equal(a, torch.ones(4))
    st.begin()
    b = st.copy("w", w)
    st.done()
    assert b is a and torch.equal(b, torch.full((4,), 2.0))  # the same buffer, refilled
    assert set(st._bufs) == {"w"}  # "gone" was not used by this save: dropped
    st.begin()
    assert st.copy("w", w, torch.float64).dtype == torch.float64  # another dtype or shape: a new buffer


def _save(saver, out, step, payload):
    tmp = ckpt.begin_save(out, step)
    ckpt.prepare_tmp(tmp)
    files = [StagedFile("model/tp0_pp0.safetensors", {"w": payload}), StagedFile("engine/extra.pt", obj={"k": 1})]
    saver.start(step, tmp, files, {"layout": {"tp": 1, "pp": 1}})


def _poll_until_committed(saver, out, step, timeout=30):
    deadline = time.time() + timeout
    while saver.pending is not None and time.time() < deadline:
        saver.poll(saver.busy(), saver.failed())
        time.sleep(0.01)
    assert saver.pending is None
    assert ckpt.latest_checkpoint(out).name == ckpt.step_dirname(step)


def test_writer_and_background_commit_then_a_failed_write_keeps_latest(tmp_path):
    saver = AsyncSaver(tmp_path, rank0=True, background=True, keep_last=2)
    _save(saver, tmp_path, 1, torch.ones(3))
    _poll_until_committed(saver, tmp_path, 1)
    final = ckpt.latest_checkpoint(tmp_path)
    assert torch.equal(load_file(str(final / "model" / "tp0_pp0.safetensors"))["w"], torch.ones(3))
    assert torch.load(final / "engine" / "extra.pt") == {"k": 1}
    # a write that fails (here: a file where the folder should be) is an error on the next
    # poll, naming the step; the previous checkpoint stays latest
    tmp = ckpt.begin_save(tmp_path, 2)
    ckpt.prepare_tmp(tmp)
    (tmp / "model").write_text("not a folder")
    saver.start(2, tmp, [StagedFile("model/tp0_pp0.safetensors", {"w": torch.zeros(3)})], {"layout": {"tp": 1, "pp": 1}})
    saver.pending.writer.join()
    with pytest.raises(ckpt.CheckpointError) as e:
        saver.poll(saver.busy(), saver.failed())
    assert "saving checkpoint step 2 failed" in str(e.value) and "\n" not in str(e.value)
    assert saver.pending is None and ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    # the next save works, and wait() commits it at once
    _save(saver, tmp_path, 3, torch.full((3,), 3.0))
    saver.wait()
    assert saver.pending is None and ckpt.latest_checkpoint(tmp_path).name == "step_000003"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # step 2's leftovers pruned with the commit


def test_synchronous_mode_commits_within_start(tmp_path):
    saver = AsyncSaver(tmp_path, rank0=True, background=False, keep_last=2)
    _save(saver, tmp_path, 4, torch.ones(2))
    assert saver.pending is None and ckpt.latest_checkpoint(tmp_path).name == "step_000004"
