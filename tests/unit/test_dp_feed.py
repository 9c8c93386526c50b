"""What each data-parallel rank feeds: the trainer's own selection, not a re-derivation.

dlm_megatron.train.run is driven in one process with the layout's DP size and rank replaced
(dp = 1, 2, 4; every rank in turn) and the engine replaced by a recorder of the micro-batches
the trainer hands it. Concatenated in rank order, the ranks' micro-batches must be the dp=1
global batch, row for row: same clean samples, same noised inputs and noise levels (keyed by
global position), same document masks, in the same order. That is what makes a run resumed
at another DP size continue exactly.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from common import COMMON_OVERRIDES, REPO, RecordingEngine

STEPS = 3


def _short_docs(tmp_path):
    """Documents of 4 to 14 tokens (several per 32-token sample, so the document masks are
    not trivial), written once with the project's shard writer."""
    import numpy as np

    from dlm_megatron.data import load_tokenizer, write_shards

    out = tmp_path / "short_docs"
    if not out.exists():
        tok = load_tokenizer("builtin")
        rng = np.random.default_rng(0)
        docs = [rng.integers(0, tok.vocab_size - 3, rng.integers(4, 15), dtype=np.uint16) for _ in range(2000)]
        write_shards(docs, out, tok, "megatron")
    return out


def _feed(tmp_path, dp: int, dp_rank: int, monkeypatch) -> list[list]:
    from dlm_megatron import train
    from dlm_megatron.config import load_config
    from dlm_megatron.parallel import dist as pdist

    real_init = pdist.init_distributed
    engines = []

    def fake_init(cfg):  # the real single-process setup, seen as rank dp_rank of dp
        return dataclasses.replace(real_init(cfg), dp=dp, dp_rank=dp_rank)

    def fake_engine(model, cfg, lay, bf16):
        engines.append(RecordingEngine(model))
        return engines[-1]

    monkeypatch.setattr(pdist, "init_distributed", fake_init)
    monkeypatch.setattr(train, "build_engine", fake_engine)
    cfg = load_config(f"{REPO}/configs/tiny.yaml", list(COMMON_OVERRIDES) + [
        f"train.steps={STEPS}", "train.save_at_end=false", "data.val_path=null", "data.document_masks=true",
        f"data.train_path={_short_docs(tmp_path)}",
        f"train.output_dir={tmp_path / f'dp{dp}_r{dp_rank}'}"])
    train.run(cfg)
    return engines[0].steps


def _rows(micro_batches, name):
    return torch.cat([getattr(b, name) for b in micro_batches])


def test_global_batch_identical_for_any_dp_size(tmp_path, monkeypatch):
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    ref = _feed(tmp_path, 1, 0, monkeypatch)
    assert len(ref) == STEPS and all(len(s) == 4 for s in ref)  # G=8, micro-batch 2: 4 micro-batches
    assert not torch.equal(_rows(ref[0], "labels_BS"), _rows(ref[1], "labels_BS"))
    # document masks travel with the batch, and differ between micro-batches (so a rank
    # handed another rank's masks, or the wrong micro-batch's, would be seen)
    masks = [b.attention_mask for step in ref for b in step]
    assert all(m is not None for m in masks) and all(bool(m.any()) for m in masks)
    assert not torch.equal(masks[0], masks[1])
    for dp in (2, 4):
        ranks = [_feed(tmp_path, dp, r, monkeypatch) for r in range(dp)]
        for step in range(STEPS):
            assert [len(rk[step]) for rk in ranks] == [4 // dp] * dp  # each rank: G / (dp * micro) micro-batches
            joined = [b for rk in ranks for b in rk[step]]             # rank 0's rows first, then rank 1's, ...
            for name in ("labels_BS", "tokens_BS", "loss_weight_BS", "t_B", "attention_mask"):
                assert torch.equal(_rows(joined, name), _rows(ref[step], name)), (dp, step, name)
