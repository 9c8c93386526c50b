"""CUDA-only checks, run by tools/gpu_check.sh stage 2 on a GPU machine (skipped elsewhere).

Each test trains through the real CLI (NCCL process group, CUDA tensors in every collective,
megatron-core + DeepSpeed on the GPU). They are independent subprocess runs, so the check
runs them in parallel (pytest -n). ``--collect-only`` on CPU (gpu_check.sh --dry-run) checks
that they still import and parametrize.
"""
import shutil

import pytest
import torch

from common import COMMON_OVERRIDES, PY, env, metrics, run, train_losses

from dlm_megatron.checkpoint import load_full_state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TRAIN = [PY, "-m", "dlm_megatron.train", "configs/tiny.yaml"]
TRAIN_BLOCK = [PY, "-m", "dlm_megatron.train", "configs/tiny_block.yaml"]
WIDER = ["model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_attention_heads=4"]

ENGINES = {
    "deepspeed-zero0": ["parallel.engine=deepspeed", "parallel.zero_stage=0"],
    "deepspeed-zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "megatron-pp1": ["parallel.engine=megatron", "parallel.zero_stage=1"],
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_bf16_training_learns(tmp_path, engine):
    out = tmp_path / engine
    p = run(TRAIN + list(COMMON_OVERRIDES) + WIDER + ENGINES[engine] +
            ["train.precision=bf16", "train.steps=40", f"train.output_dir={out}"])
    losses = train_losses(out)
    assert len(losses) == 40 and all(l == l for l in losses), p.stdout[-2000:]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert "| cuda bfloat16 params" in p.stdout or "| cuda float32 params + bf16 autocast" in p.stdout, p.stdout[:2000]
    assert "mem_reserved_gib" in [r for r in metrics(out) if r.get("split") != "val"][-1]  # CUDA allocator figures


@pytest.mark.parametrize("engine", ["deepspeed-zero0", "megatron-pp1"])
def test_bf16_first_step_close_to_fp32(tmp_path, engine):
    losses = {}
    for prec in ("fp32", "bf16"):
        out = tmp_path / prec
        run(TRAIN + list(COMMON_OVERRIDES) + ENGINES[engine] + [f"train.precision={prec}", "train.steps=1", f"train.output_dir={out}"])
        losses[prec] = train_losses(out)[0]
    rel = abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
    # bf16 really computes in bf16 (not equal) and stays close (8 mantissa bits, 2 layers).
    assert 0 < rel < 1e-2, losses


def test_sdpa_matches_dense_attention(tmp_path):
    losses = {}
    for backend in ("dense", "sdpa"):
        out = tmp_path / backend
        run(TRAIN + list(COMMON_OVERRIDES) + [f"model.attention_backend={backend}", "train.precision=fp32", "train.steps=2",
                                              f"train.output_dir={out}"])
        losses[backend] = train_losses(out)
    assert losses["sdpa"] == pytest.approx(losses["dense"], rel=1e-4)


def test_block_diffusion_flex_trains_and_matches_dense(tmp_path):
    first = {}
    for backend in ("dense", "flex"):
        out = tmp_path / backend
        run(TRAIN_BLOCK + list(COMMON_OVERRIDES) + [f"model.attention_backend={backend}", "train.precision=fp32",
                                                    "train.steps=1", f"train.output_dir={out}"])
        first[backend] = train_losses(out)[0]
    assert first["flex"] == pytest.approx(first["dense"], rel=1e-4)
    out = tmp_path / "flex_bf16"
    run(TRAIN_BLOCK + list(COMMON_OVERRIDES) + WIDER + ["model.attention_backend=flex", "train.precision=bf16", "train.steps=40",
                                                        f"train.output_dir={out}"])
    losses = train_losses(out)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_transformer_engine_spec_matches_local(tmp_path):
    pytest.importorskip("transformer_engine", reason="Transformer Engine not installed")
    a, b = tmp_path / "local", tmp_path / "te"
    for d, impl in ((a, "local"), (b, "transformer_engine")):
        run(TRAIN + list(COMMON_OVERRIDES) + [f"model.transformer_impl={impl}", "train.precision=fp32", "train.steps=2",
                                              f"train.output_dir={d}"])
    assert metrics(a)[0]["loss"] == pytest.approx(metrics(b)[0]["loss"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sequence parallel needs TP>=2, i.e. two GPUs")
def test_sequence_parallel_matches_tp(tmp_path):
    """Local spec only: the config refuses sequence parallelism with Transformer Engine, which
    no test has run (tests/unit/test_sequence_parallel.py checks the refusal)."""
    impl = "local"
    losses = {}
    for sp in ("false", "true"):
        out = tmp_path / f"sp_{sp}"
        run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dlm_megatron.train", "configs/tiny.yaml",
             *COMMON_OVERRIDES, "parallel.tp=2", f"parallel.sequence_parallel={sp}", "parallel.engine=megatron",
             f"model.transformer_impl={impl}", "train.precision=fp32", "train.steps=2", f"train.output_dir={out}"])
        losses[sp] = train_losses(out)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.mark.parametrize("engine", ["deepspeed-zero1", "megatron-pp1"])
def test_background_saves_write_the_state_of_their_step(tmp_path, engine):
    """Background saves on CUDA: the weights are copied into pinned host buffers with
    non-blocking copies while training goes on (and, on the megatron engine, after the
    overlapped parameter all-gather is finished). What they write must be the state at the
    save's step, i.e. a synchronous run's checkpoints; a run resumed from the middle one ends
    where the uninterrupted run did. A copy read before it completed, or after the next
    optimizer step, differs by a whole step (about lr = 1e-2 relative)."""
    args = (TRAIN + list(COMMON_OVERRIDES) + ENGINES[engine] +
            ["train.precision=fp32", "model.attention_backend=dense", "train.steps=6", "train.save_interval=2",
             "train.keep_last=10", "train.adam_eps=1e-5"])
    dirs = {mode: tmp_path / f"async_{mode}" for mode in ("true", "false")}
    for mode, out in dirs.items():
        run(args + [f"train.async_save={mode}", f"train.output_dir={out}"])

    def state(d, step):
        return load_full_state_dict(d / "checkpoints" / f"step_{step:06d}")

    for step in (2, 4, 6):  # run to run on CUDA: equal up to kernel nondeterminism
        assert _max_rel_diff(state(dirs["true"], step), state(dirs["false"], step)) < 1e-4, step
    resumed = tmp_path / "resumed"  # the async run's checkpoints up to step 4, then on to 6
    (resumed / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        name = f"step_{step:06d}"
        shutil.copytree(dirs["true"] / "checkpoints" / name, resumed / "checkpoints" / name)
    (resumed / "checkpoints" / "latest").write_text("step_000004\n")
    run(args + ["train.async_save=true", f"train.output_dir={resumed}"])
    assert _max_rel_diff(state(resumed, 6), state(dirs["true"], 6)) < 1e-4


def test_moe_on_cuda_matches_cpu_and_resumes(tmp_path):
    """Mixture of experts on the GPU path: megatron-core's all-to-all token dispatcher (the CPU
    runs the allgather one) with SequentialMLP experts (grouped GEMM needs Transformer
    Engine). fp32: the first two steps' losses equal the CPU run's (same weights, same batches;
    the dispatchers only move tokens, so what differs is reduction order), the checkpoint
    holds the canonical expert names, and a resume from step 2 ends where the uninterrupted
    run does."""
    moe = [PY, "-m", "dlm_megatron.train", "configs/tiny_moe.yaml", *COMMON_OVERRIDES, "train.precision=fp32",
           "train.adam_eps=1e-5", "model.attention_backend=dense"]
    cpu, gpu, resumed = tmp_path / "cpu", tmp_path / "gpu", tmp_path / "resumed"
    run(moe + ["train.steps=2", f"train.output_dir={cpu}"], env=env(CUDA_VISIBLE_DEVICES=""))
    run(moe + ["train.steps=3", "train.save_interval=1", "train.keep_last=5", f"train.output_dir={gpu}"])
    assert train_losses(gpu)[:2] == pytest.approx(train_losses(cpu), rel=1e-4), (train_losses(gpu), train_losses(cpu))
    state = load_full_state_dict(gpu / "checkpoints" / "step_000003")
    assert sum(".local_experts." in k for k in state) == 2 * 8 * 2, sorted(state)[:12]  # layers x experts x (fc1, fc2)
    shutil.copytree(gpu / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    (resumed / "checkpoints" / "latest").write_text("step_000002\n")
    run(moe + ["train.steps=3", "train.save_interval=1", f"train.output_dir={resumed}"])
    assert _max_rel_diff(load_full_state_dict(resumed / "checkpoints" / "step_000003"), state) < 1e-4
