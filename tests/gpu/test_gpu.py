"""CUDA-only checks, run by tools/gpu_check.sh on a GPU machine (skipped elsewhere)."""
import json
import os

import pytest
import torch

from common import COMMON_OVERRIDES, PY, metrics, run, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TRAIN = [PY, "-m", "dlm_megatron.train", "configs/tiny.yaml"]


def test_bf16_training_on_gpu_learns(tmp_path):
    out = tmp_path / "bf16"
    run(TRAIN + list(COMMON_OVERRIDES) + ["train.precision=bf16", "train.steps=40", f"train.output_dir={out}",
                                          "model.hidden_size=256", "model.ffn_hidden_size=704"])
    losses = [r["loss"] for r in metrics(out) if r.get("split") != "val"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_bf16_close_to_fp32_first_step(tmp_path):
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    for d, prec in ((a, "fp32"), (b, "bf16")):
        run(TRAIN + list(COMMON_OVERRIDES) + [f"train.precision={prec}", "train.steps=1", f"train.output_dir={d}"])
    la, lb = metrics(a)[0]["loss"], metrics(b)[0]["loss"]
    assert abs(la - lb) / la < 2e-2


def test_transformer_engine_spec_matches_local(tmp_path):
    pytest.importorskip("transformer_engine", reason="Transformer Engine not installed")
    a, b = tmp_path / "local", tmp_path / "te"
    for d, impl in ((a, "local"), (b, "transformer_engine")):
        run(TRAIN + list(COMMON_OVERRIDES) + [f"model.transformer_impl={impl}", "train.precision=fp32", "train.steps=2",
                                              f"train.output_dir={d}"])
    assert metrics(a)[0]["loss"] == pytest.approx(metrics(b)[0]["loss"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sequence parallel needs TP>=2, i.e. two GPUs")
def test_sequence_parallel_matches_tp(tmp_path):
    pytest.importorskip("transformer_engine", reason="sequence parallel uses the Transformer Engine spec")
    losses = {}
    for sp in ("false", "true"):
        out = tmp_path / f"sp_{sp}"
        run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlm_megatron.train", "configs/tiny.yaml",
             *COMMON_OVERRIDES, "parallel.tp=2", f"parallel.sequence_parallel={sp}", "model.transformer_impl=transformer_engine",
             "train.precision=fp32", "train.steps=2", f"train.output_dir={out}"])
        losses[sp] = [r["loss"] for r in metrics(out) if r.get("split") != "val"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
