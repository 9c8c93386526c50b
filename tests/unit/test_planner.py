"""Tests of the layout planner (dlm_megatron/planner.py, tools/plan.py). CPU only, ~50 s (~40 s of it one measuring subprocess).

Validation against measured memory
----------------------------------
A subprocess (this file run as a script with ``--measure``) trains the real model for two
optimizer steps at four small fp32 configs, the way ``tests/distributed/reference.py``
does (``pdist.init_distributed``, ``build_model``, ``init_weights``, torch AdamW with our
param groups, the real data loader and objective, ``weighted_token_loss``), and reports the
peak of live tensor memory. The planner's fp32 prediction (precision fp32, ZeRO 0,
tp = pp = 1, no overhead allowance: ``memory.modeled_peak``) must be within 15%.

The cases are chosen so each planner term is exercised where it dominates:
  states       4 layers x 384, 64-token sequences: weights + grads + Adam moments ~85% of peak
  activations  4 layers x 128, seq 256, micro batch 8, no recompute: activations + logits ~83%
  full         the same with model.recompute=full: checkpointed inputs + one recomputed layer
  selective    the same with selective recompute and GQA (2 KV heads)
  moe_*        mixture of experts: expert states, then routed activations
  kv_channels  heads of 64 on a 128-wide model (q = 256): parameters and attention activations

How the peak is measured: torch's CPU allocator reports every allocation and free to the
profiler when ``torch.profiler.profile(profile_memory=True)`` is active, with a running
"Total Allocated" counter of the bytes allocated inside the session and not yet freed. The
model, optimizer and training steps all run inside the session, so the counter's maximum
is the peak of live tensor bytes: the CPU analogue of ``torch.cuda.max_memory_allocated``.
Peak RSS was rejected: it also counts the interpreter, megatron-core/DeepSpeed imports and
glibc's cached free memory, and its baseline drifts, so differences of a few hundred MB
would be noise. Gradients are zeroed in place (``zero_grad(set_to_none=False)``) so they stay
allocated through the next forward, as DeepSpeed's and megatron-core's gradient buffers do
on GPU; megatron's global attention buffer is reset between cases so each case pays for its
own. Two steps suffice: Adam moments exist from the first step's update on, so the second
step's forward/backward sees every term.

The GPU-only parts (bf16 terms, Transformer Engine kernels, ZeRO partitioning, TP/PP,
overhead allowance) are checked here as formulas, not against measurements.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SMALL = ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=384"]
MOE = ["model.num_moe_experts=8", "model.moe_router_topk=2", "model.qk_layernorm=true", "model.moe_router_pre_softmax=true",
       "model.moe_aux_loss_coeff=0.01"]
MEASURE_CASES = {
    "states": ["model.num_layers=4", "model.hidden_size=384", "model.num_attention_heads=6",
               "model.ffn_hidden_size=1024", "data.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4"],
    "activations": SMALL + ["data.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=8"],
    "full": SMALL + ["data.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=8", "model.recompute=full"],
    "selective": SMALL + ["data.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=8",
                          "model.recompute=selective", "model.num_query_groups=2"],
    # Mixture of experts (megatron-core's MoE layer, SequentialMLP, LLaDA-MoE routing with aux loss):
    # 8 experts' states dominate; then top-2 routed activations at a long sequence.
    "moe_states": MOE + ["model.num_layers=2", "model.hidden_size=384", "model.num_attention_heads=6",
                         "model.moe_ffn_hidden_size=512", "data.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4"],
    "moe_activations": MOE + SMALL + ["model.moe_ffn_hidden_size=192", "data.seq_len=256", "train.micro_batch_size=8",
                                      "train.global_batch_size=8"],
    # Qwen3-style heads wider than hidden / heads (model.kv_channels): 4 heads of 64 on a
    # 128-wide stream, so the QKV / output projections, q/k/v biases, q/k norms and attention
    # activations are q = 256 wide, not h.
    "kv_channels": SMALL + ["model.kv_channels=64", "model.num_query_groups=2", "model.qk_layernorm=true",
                            "model.add_qkv_bias=true", "data.seq_len=256", "train.micro_batch_size=8",
                            "train.global_batch_size=8"],
}
BASE = ["train.precision=fp32", "parallel.zero_stage=0", "parallel.tp=1", "parallel.pp=1", "logging.wandb=disabled",
        "diffusion.random_length_prob=0.0", f"data.cache_dir={REPO}/.cache/data", "train.steps=2"]
MEASURE_STEPS = 2


# ---------------------------------------------------------------------------------------
# The measurement (runs in a subprocess: python tests/unit/test_planner.py --measure)


def _peak_from_profile(prof) -> int:
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    first = min(mem, key=lambda a: a["Ev Idx"])
    start = first["Total Allocated"] - first["Bytes"]  # counter value when the session began
    return max(a["Total Allocated"] for a in mem) - start


def _cpu_recompute_shim() -> None:
    """Activation recomputation saves/restores the CUDA RNG state; without CUDA, make that a
    no-op (dropout is 0, nothing random runs inside a layer). Only patches the stock
    megatron-core functions, so a shim installed by parallel/cpu_compat.py wins."""
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        return
    if getattr(mrandom._get_cuda_rng_state, "__module__", "") == mrandom.__name__:
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0)
    if getattr(mrandom._set_cuda_rng_state, "__module__", "") == mrandom.__name__:
        mrandom._set_cuda_rng_state = lambda *a, **k: None


def _measure(names: list[str]) -> None:
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import gc
    import time

    import numpy as np
    import torch
    from megatron.core import parallel_state as ps
    from torch.profiler import ProfilerActivity, profile

    from dlm_megatron.config import load_config
    from dlm_megatron.data.corpus import resolve_data_path
    from dlm_megatron.data.loader import PackedDataset, sample_indices
    from dlm_megatron.data.tokenizer import load_tokenizer
    from dlm_megatron.diffusion.masked import weighted_token_loss
    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.engine.deepspeed_engine import param_groups
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist

    torch.manual_seed(0)
    for name in names:
        cfg = load_config(REPO / "configs/tiny.yaml", BASE + MEASURE_CASES[name])
        if not torch.distributed.is_initialized():
            pdist.init_distributed(cfg)
            _cpu_recompute_shim()
        tok = load_tokenizer(cfg.data.tokenizer)
        ds = PackedDataset(resolve_data_path(cfg.data.train_path, cfg.data.cache_dir, tok), cfg.data.seq_len, tok.eot_id)
        t = cfg.train
        G, mbs = t.global_batch_size, t.micro_batch_size
        obj = build_objective(cfg.diffusion, tok.mask_id, t.seed)
        xs = [torch.from_numpy(np.stack([ds[int(i)] for i in sample_indices(s, G, len(ds), t.seed)]))
              for s in range(MEASURE_STEPS)]
        # Fresh MoE aux-loss tracker (process-global, sized by the first model's layers) and
        # megatron global buffer (QK^T scratch of the dense attention) for every case.
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        ps.destroy_global_memory_buffer()
        ps._set_global_memory_buffer()
        gc.collect()
        t0 = time.time()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model = build_model(cfg, tok.vocab_size, pre_process=True, post_process=True)
            init_weights(model, cfg, tp_rank=0, pp_rank=0)
            opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                    betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
            losses = []
            for step in range(MEASURE_STEPS):
                pos = torch.arange(step * G, (step + 1) * G)
                opt.zero_grad(set_to_none=False)
                for i in range(0, G, mbs):
                    b = obj.make_batch(xs[step][i:i + mbs], pos[i:i + mbs], step=step, global_batch_size=G)
                    nll = model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=b.labels_BS,
                                explicit_positions=b.position_ids_BS is not None)
                    loss = weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens)
                    (loss / (G // mbs)).backward()
                    losses.append(loss.item())
                    del nll, loss, b
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
            n_params = sum(p.numel() for p in model.parameters())
            del model, opt
        seconds = time.time() - t0
        print(json.dumps({"case": name, "peak_bytes": _peak_from_profile(prof), "params": n_params,
                          "vocab_size": tok.vocab_size, "seconds": round(seconds, 1),
                          "losses_finite": all(np.isfinite(losses))}), flush=True)
        del prof
        gc.collect()
    pdist.destroy()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        _measure(sys.argv[2:] or list(MEASURE_CASES))
        sys.exit(0)


# ---------------------------------------------------------------------------------------
# Tests

import pytest  # noqa: E402

from dlm_megatron.config import load_config  # noqa: E402
from dlm_megatron.planner import GIB, PlanError, param_counts, model_dims, plan  # noqa: E402

PLAN_PY = REPO / "tools" / "plan.py"


def _cfg(path="configs/tiny.yaml", *overrides):
    return load_config(REPO / path, list(overrides))


def _plan(cfg, gpus=1, mem=80.0, vocab=8192, **kw):
    return plan(cfg, gpus=gpus, gpu_mem_gib=mem, vocab_size=vocab, **kw)


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", WANDB_SILENT="true")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)  # set by in-process model builds of other tests; not ours to join
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"measurement failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == list(MEASURE_CASES)
    return {r["case"]: r for r in rows}


def test_memory_prediction_within_15_percent_of_measured_peak(measured):
    lines = [f"{'case':<12}{'params':>10}{'measured MiB':>14}{'predicted MiB':>15}{'error':>8}  dominant terms"]
    failures = []
    for name, overrides in MEASURE_CASES.items():
        r = measured[name]
        assert r["losses_finite"]
        cfg = _cfg("configs/tiny.yaml", *BASE, *overrides)
        p = _plan(cfg, vocab=r["vocab_size"], on_gpu=False)
        mem = p["memory"]
        assert p["params"]["total"] == r["params"]  # same model
        pred, meas = mem["modeled_peak"], r["peak_bytes"]
        err = pred / meas - 1
        states = mem["weights"] + mem["gradients"] + mem["optimizer"]
        share = f"states {states / pred:.0%}, activations {mem['activation_peak'] / pred:.0%}"
        lines.append(f"{name:<12}{r['params']:>10,}{meas / 2**20:>14.1f}{pred / 2**20:>15.1f}{err:>+8.1%}  {share}")
        if abs(err) > 0.15:
            failures.append(name)
        # Each case tests what it claims to test.
        if name in ("states", "moe_states"):
            assert states / pred > 0.75
        else:
            assert mem["activation_peak"] / pred > 0.5
    print("\n" + "\n".join(lines))
    assert not failures, "prediction off by more than 15%:\n" + "\n".join(lines)
    # Full recompute must cut activation memory, as measured.
    assert measured["full"]["peak_bytes"] < 0.7 * measured["activations"]["peak_bytes"]


def test_8b_parameter_count_matches_llada():
    cfg = _cfg("configs/8b.yaml")
    p = _plan(cfg, gpus=64, vocab=126464)
    total = p["params"]["total"]
    # LLaDA-8B: 32 x (4 * 4096^2 + 3 * 4096 * 12288 + 2 * 4096) + 2 * 126464 * 4096 + 4096
    assert total == 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 2 * 126464 * 4096 + 4096
    assert 7.9e9 < total < 8.1e9
    # TP=2 halves every matrix; norms are replicated.
    norms = 32 * 2 * 4096 + 4096
    assert p["params"]["per_gpu"] == (total - norms) // 2 + norms


def test_flops_per_token_matches_trainer():
    from dlm_megatron.train import flops_per_token

    for path, extra in (("configs/tiny.yaml", ()), ("configs/8b.yaml", ()), ("configs/tiny.yaml", ("diffusion.objective=block",))):
        cfg = _cfg(path, *extra)
        p = _plan(cfg, gpus=2 if "8b" in path else 1, vocab=126464)
        for on_gpu in (True, False):
            assert _plan(cfg, gpus=2 if "8b" in path else 1, vocab=126464, on_gpu=on_gpu)["flops_per_token"] == pytest.approx(
                flops_per_token(cfg, 126464, cfg.data.seq_len, on_gpu=on_gpu), rel=1e-12)
    # Block diffusion runs 2L model tokens per L data tokens, attention over 2L: with a dense
    # kernel all (2L)^2 pairs count; FlexAttention executes only the non-empty 128x128 tiles.
    from dlm_megatron.planner import layer_matrix_params, output_fraction

    masked_cfg = _cfg("configs/tiny.yaml")
    block_cfg = _cfg("configs/tiny.yaml", "diffusion.objective=block", "model.attention_backend=sdpa")
    masked, block_dense = _plan(masked_cfg), _plan(block_cfg)
    dm = model_dims(masked_cfg, 8192)
    L, h, s = dm.layers, dm.hidden, masked_cfg.data.seq_len
    # the output layer runs on the positions with loss only: E[t] of U(eps, 1) for masked,
    # E[t] / 2 of the 2L rows for block (only x_t's masked tokens), every position for AR
    assert output_fraction(masked_cfg) == pytest.approx(0.5005) and output_fraction(block_cfg) == pytest.approx(0.5005 / 2)
    assert output_fraction(_cfg("configs/tiny.yaml", "diffusion.objective=ar")) == 1.0
    assert masked["flops_per_token"] == pytest.approx(6 * (L * layer_matrix_params(dm) + 8192 * h * 0.5005) + 12 * L * h * s)
    assert block_dense["flops_per_token"] == pytest.approx(
        2 * (6 * (L * layer_matrix_params(dm) + 8192 * h * 0.5005 / 2) + 12 * L * h * 2 * s))
    cfg = _cfg("configs/8b_block.yaml")
    dense, flex = (flops_per_token(cfg, 126464, 4096, on_gpu=g) for g in (False, True))  # auto: sdpa on CPU, flex on GPU
    attn_dense = 2 * 12 * 32 * 4096 * 8192
    assert dense - flex == pytest.approx(attn_dense * (1 - 17 / 64), rel=1e-12)  # 17 of 64 tiles per row on average at L=4096, K=16


def test_kv_channels_widen_attention_params_and_flops():
    """model.kv_channels (Qwen3: heads x head_dim != hidden): the QKV projection is
    h x (q + 2kv), the output projection q x h and attention 12 * L * q * s, with q = heads x
    kv_channels, in the planner and in the trainer's MFU alike. (The built model's parameter
    count is checked against the planner in the 'kv_channels' measured case.)"""
    from dlm_megatron.planner import layer_matrix_params
    from dlm_megatron.train import flops_per_token

    cfg = _cfg("configs/tiny.yaml", "model.hidden_size=64", "model.num_attention_heads=4", "model.kv_channels=32",
               "model.num_query_groups=2", "model.ffn_hidden_size=128")
    dm = model_dims(cfg, 8192)
    h, q, kv, L, s = 64, 128, 64, dm.layers, cfg.data.seq_len
    assert (dm.head_dim, dm.q_dim, dm.kv_dim) == (32, q, kv)
    assert layer_matrix_params(dm) == h * (q + 2 * kv) + q * h + 3 * h * 128
    want = 6 * (L * layer_matrix_params(dm) + 8192 * h * 0.5005) + 12 * L * q * s
    assert _plan(cfg)["flops_per_token"] == pytest.approx(want, rel=1e-12)
    for on_gpu in (True, False):
        assert flops_per_token(cfg, 8192, s, on_gpu=on_gpu) == pytest.approx(want, rel=1e-12)
    # None means hidden / heads: the same model as saying so
    same = _cfg("configs/tiny.yaml", "model.kv_channels=64")
    assert _plan(same)["params"] == _plan(_cfg("configs/tiny.yaml"))["params"]


# Bytes per parameter (weights, gradients, optimizer) of each engine in bf16 as configured in
# dlm_megatron/engine/, and the ZeRO stage from which DP divides each term (None: never).
BF16_STATES = {
    ("deepspeed", 0): ((6, None), (4, None), (8, None)),  # autocast: fp32 weights + bf16 copies, fp32 grads, m + v
    ("deepspeed", 1): ((2, None), (4, None), (12, 1)),    # BF16_Optimizer: full fp32 accumulator; master + m + v sharded
    ("deepspeed", 2): ((2, None), (4, 2), (12, 1)),
    ("deepspeed", 3): ((2, 3), (4, 2), (12, 1)),
    ("megatron", 0): ((2, None), (4, None), (12, None)),  # fp32 grad buffer, Float16Optimizer's fp32 master
    ("megatron", 1): ((2, None), (4, None), (12, 1)),     # distributed optimizer shards master + m + v
}


@pytest.mark.parametrize("engine,stage", sorted(BF16_STATES))
def test_state_memory_follows_each_engine(engine, stage):
    cfg = _cfg("configs/8b.yaml", f"parallel.zero_stage={stage}", f"parallel.engine={engine}")
    one = _plan(cfg, gpus=2, vocab=126464)["memory"]   # dp = 1
    many = _plan(cfg, gpus=32, vocab=126464)["memory"]  # dp = 16
    psi = one["params"]
    for term, (nbytes, from_stage) in zip(("weights", "gradients", "optimizer"), BF16_STATES[engine, stage]):
        assert one[term] == nbytes * psi, term
        assert many[term] == (nbytes * psi / 16 if from_stage is not None and stage >= from_stage else nbytes * psi), term
    # Activations do not depend on ZeRO or DP; DeepSpeed's gradient bucket (5e8 fp32) comes with ZeRO 1-3.
    assert many["activation_peak"] == one["activation_peak"]
    assert (many["zero_buffers"] >= 4 * 500_000_000) == (engine == "deepspeed" and stage >= 1)


def test_fp32_states():
    mem = _plan(_cfg("configs/tiny.yaml", "train.precision=fp32"))["memory"]
    psi = mem["params"]
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (4 * psi, 4 * psi, 8 * psi)
    # DeepSpeed ZeRO >= 1 adds an fp32 copy of the partition it updates
    mem = _plan(_cfg("configs/tiny.yaml", "train.precision=fp32", "parallel.zero_stage=1"))["memory"]
    assert mem["optimizer"] == 12 * psi
    # precision auto is planned as a GPU run: bf16 (ZeRO-0: autocast over fp32 weights)
    mem = _plan(_cfg("configs/tiny.yaml", "train.precision=auto"))["memory"]
    assert (mem["weights"], mem["optimizer"]) == (6 * psi, 8 * psi)


def test_tp_divides_weights_and_activations():
    LOCAL = ["model.transformer_impl=local"]  # sequence parallelism is proven (and allowed) on the local spec only
    base = _plan(_cfg("configs/8b.yaml", *LOCAL, "parallel.tp=1", "parallel.zero_stage=0"), gpus=1, vocab=126464)
    tp4 = _plan(_cfg("configs/8b.yaml", *LOCAL, "parallel.tp=4", "parallel.zero_stage=0"), gpus=4, vocab=126464)
    norms = 32 * 2 * 4096 + 4096
    assert tp4["params"]["per_gpu"] == (base["params"]["per_gpu"] - norms) // 4 + norms
    assert tp4["memory"]["weights"] == pytest.approx(base["memory"]["weights"] / 4, rel=1e-4)
    a1, a4 = base["memory"]["activations"], tp4["memory"]["activations"]
    # Norm inputs/outputs stay replicated without sequence parallelism...
    assert a4["per_layer_per_token"] > a1["per_layer_per_token"] / 4
    # ...and sequence parallelism divides them too.
    sp = _plan(_cfg("configs/8b.yaml", *LOCAL, "parallel.tp=4", "parallel.zero_stage=0", "parallel.sequence_parallel=true", "parallel.engine=megatron"),
               gpus=4, vocab=126464)["memory"]["activations"]
    assert sp["per_layer_per_token"] == pytest.approx(a1["per_layer_per_token"] / 4, rel=0.01)


def test_block_objective_doubles_activations():
    masked = _plan(_cfg("configs/125m.yaml", "model.recompute=full"), vocab=50304)
    block = _plan(_cfg("configs/125m.yaml", "model.recompute=full", "diffusion.objective=block"), vocab=50304)
    assert block["layout"]["model_seq_len"] == 2 * masked["layout"]["model_seq_len"]
    am, ab = masked["memory"]["activations"], block["memory"]["activations"]
    assert ab["saved_layers"] == pytest.approx(2 * am["saved_layers"])
    assert ab["logits_ce"] == pytest.approx(2 * am["logits_ce"], rel=0.01)


def test_recompute_modes_order_and_pipeline_in_flight():
    peaks = {r: _plan(_cfg("configs/tiny.yaml", f"model.recompute={r}", "data.seq_len=512"))["memory"]["activation_peak"]
             for r in ("none", "selective", "full")}
    assert peaks["full"] < peaks["selective"] < peaks["none"]
    # 1F1B: the first of p stages holds min(p, microbatches) microbatches of its L/p layers.
    cfg = _cfg("configs/8b.yaml", "parallel.pp=4", "parallel.tp=1")
    p = _plan(cfg, gpus=64, vocab=126464)  # dp 16, 1280 / (4 * 16) = 20 microbatches
    first, last = p["stages"]["first"]["activations"], p["stages"]["last"]["activations"]
    assert (first["in_flight_microbatches"], last["in_flight_microbatches"]) == (4, 1)
    assert first["saved_layers"] == pytest.approx(4 * last["saved_layers"])
    assert last["logits_ce"] > 0 and first["logits_ce"] == 0


@pytest.mark.parametrize("preset", ["configs/8b.yaml", "configs/8b_block.yaml"])
def test_8b_presets_plan_within_90_percent_of_80gb(preset):
    from dlm_megatron.planner import PRESET_TARGET, format_plan

    p = _plan(_cfg(preset), gpus=64, vocab=126464)
    mem = p["memory"]
    assert mem["fits"] and mem["total"] <= PRESET_TARGET * 80 * GIB, mem["total"] / GIB
    assert p["layout"]["dp"] == 32 and p["layout"]["num_microbatches"] == (20 if preset == "configs/8b.yaml" else 40)
    assert 20e9 < p["throughput"]["tokens_per_day"] < 80e9
    assert f"{mem['total'] / (80 * GIB):.0%} of the GPU, presets aim at <= 90%" in format_plan(p)


def test_impossible_layouts_raise():
    with pytest.raises(PlanError, match="not divisible"):
        _plan(_cfg("configs/8b.yaml"), gpus=63, vocab=126464)
    with pytest.raises(PlanError, match="global_batch_size"):
        _plan(_cfg("configs/8b.yaml"), gpus=2 * 48, vocab=126464)  # dp 48: 1280 % (4 * 48)
    # layouts no test proves are refused by the config itself (the planner and trainer agree)
    from dlm_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="zero_stage"):
        _cfg("configs/8b.yaml", "parallel.pp=2", "parallel.zero_stage=2")
    # sequence parallelism: megatron engine with the local spec only (unproven with TE), never on DeepSpeed
    with pytest.raises(ConfigError, match="parallel.engine=megatron"):
        _cfg("configs/tiny.yaml", "parallel.sequence_parallel=true", "parallel.tp=2", "parallel.engine=deepspeed")
    with pytest.raises(ConfigError, match="parallel.engine=megatron"):
        _cfg("configs/tiny.yaml", "parallel.sequence_parallel=true", "parallel.tp=2", "model.transformer_impl=transformer_engine",
             "parallel.engine=deepspeed")
    with pytest.raises(ConfigError, match="model.transformer_impl=local"):
        _cfg("configs/tiny.yaml", "parallel.sequence_parallel=true", "parallel.tp=2", "model.transformer_impl=transformer_engine")
    _cfg("configs/tiny.yaml", "parallel.sequence_parallel=true", "parallel.tp=2")  # auto: the megatron engine
    _cfg("configs/tiny.yaml", "parallel.sequence_parallel=true", "parallel.tp=2", "parallel.engine=megatron", "parallel.zero_stage=1")
    with pytest.raises(ConfigError, match="continuous"):
        _cfg("configs/tiny.yaml", "diffusion.objective=continuous", "parallel.pp=2")


def _cli(*args):
    return subprocess.run([sys.executable, str(PLAN_PY), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_json_and_text():
    p = _cli("configs/8b.yaml", "--gpus", "64", "--gpu-mem-gib", "80", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["memory"]["fits"] is True and d["layout"]["tp"] == 2
    t = _cli("configs/8b.yaml", "train.micro_batch_size=8", "--gpus", "64", "--gpu-mem-gib", "80")
    assert t.returncode == 0
    for word in ("parameters", "FLOPs per token", "weights", "gradients", "optimizer states", "activations",
                 "logits", "overhead", "DOES NOT FIT", "tokens/day"):
        assert word in t.stdout
    h = _cli("--help")
    assert h.returncode == 0
    for flag in ("--gpus", "--gpu-mem-gib", "--mfu", "--peak-tflops", "--overhead-gib", "--fragmentation",
                 "--vocab-size", "--json"):
        assert flag in h.stdout


@pytest.mark.parametrize("args, needle", [
    (["configs/8b.yaml", "--gpus", "63", "--gpu-mem-gib", "80"], "parallel.tp*parallel.pp"),
    (["configs/8b.yaml", "parallel.tp=3", "--gpus", "63", "--gpu-mem-gib", "80"], "parallel.tp"),
    (["configs/8b.yaml", "model.nope=1", "--gpus", "64", "--gpu-mem-gib", "80"], "model.nope"),
    (["configs/missing.yaml", "--gpus", "8", "--gpu-mem-gib", "80"], "not found"),
    (["configs/8b.yaml", "--gpus", "64", "--gpu-mem-gib", "0"], "--gpu-mem-gib"),
    (["configs/8b.yaml", "--gpus", "64", "--gpu-mem-gib", "80", "--mfu", "1.5"], "--mfu"),
    (["configs/8b.yaml", "--gpu-mem-gib", "80"], "--gpus"),
])
def test_cli_errors_are_one_line_exit_2(args, needle):
    p = _cli(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan.py: error:") and needle in lines[0], p.stderr


def test_dense_attention_that_does_not_fit_is_refused():
    """On a GPU the trainer refuses megatron's unfused s x s attention when the planner says
    the layout does not fit the card (check_dense_attention_fits); fused kernels pass."""
    from dlm_megatron.config import ConfigError
    from dlm_megatron.model.denoiser import build_model
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import check_dense_attention_fits

    small = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4", "data.seq_len=4096",
             "train.micro_batch_size=8", "train.global_batch_size=8"]
    for backend in ("dense", "sdpa"):
        cfg = _cfg("configs/tiny.yaml", *small, f"model.attention_backend={backend}")
        pdist.init_distributed(cfg)
        model = build_model(cfg, 8192, pre_process=True, post_process=True)
        need = plan(cfg, gpus=1, gpu_mem_gib=1000.0, vocab_size=8192, on_gpu=True)["memory"]["total"]
        check_dense_attention_fits(cfg, model, gpus=1, vocab=8192, device_bytes=int(2 * need))  # fits: fine
        if backend == "dense":
            with pytest.raises(ConfigError, match="model.attention_backend=dense keeps the s x s attention scores"):
                check_dense_attention_fits(cfg, model, gpus=1, vocab=8192, device_bytes=int(0.5 * need))
        else:  # a fused kernel is never refused by this check
            check_dense_attention_fits(cfg, model, gpus=1, vocab=8192, device_bytes=1)


def test_mfu_peak_per_card_and_none_on_cpu(monkeypatch):
    import torch

    from dlm_megatron.train import peak_flops

    monkeypatch.delenv("DLM_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu")) is None  # no defensible CPU peak: no MFU
    cards = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12,
             "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12, "Some Future GPU": None}
    for name, want in cards.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0)) == want, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), bf16=False) == 67e12
    monkeypatch.setenv("DLM_PEAK_TFLOPS", "736")
    assert peak_flops(torch.device("cuda", 0)) == 736e12


# ---------------------------------------------------------------------------------------
# Mixture of experts


def test_moe_7b_a1b_counts_like_llada_moe():
    """LLaDA-MoE-7B-A1B: 16 x (attention 4 h^2 + 64 experts x 3 h 1024 + router 64 h + norms
    2h + q/k norms 2 x 128) + untied embedding and output layer + final norm; active: 8 experts."""
    cfg = _cfg("configs/moe_7b_a1b.yaml")
    p = _plan(cfg, gpus=32, vocab=157184)["params"]
    h, V = 2048, 157184
    per_layer = 4 * h * h + 64 * 3 * h * 1024 + 64 * h + 2 * h + 2 * 128
    assert p["total"] == 16 * per_layer + 2 * V * h + h
    assert p["experts"] == 16 * 64 * 3 * h * 1024
    assert p["active"] == p["total"] - 16 * 56 * 3 * h * 1024  # 56 of 64 experts idle per token
    assert 7.3e9 < p["total"] < 7.4e9 and 1.0e9 < p["active"] - 2 * V * h < 1.1e9
    # ep 8: each GPU holds 8 of the 64 experts of every layer
    assert p["per_gpu_experts"] == p["experts"] // 8
    assert p["per_gpu"] == p["total"] - p["experts"] + p["experts"] // 8


def test_moe_expert_states_shard_over_expert_data_parallel_ranks():
    """Distributed optimizer: dense parameters' master + m + v over dp ranks, experts' over
    the dp / ep ranks that hold the same experts; weights and fp32 gradients are not sharded."""
    cfg = _cfg("configs/moe_7b_a1b.yaml")
    p = _plan(cfg, gpus=32, vocab=157184)
    par, mem = p["params"], p["memory"]
    dense, exp = par["per_gpu"] - par["per_gpu_experts"], par["per_gpu_experts"]
    assert mem["optimizer"] == pytest.approx(12 * dense / 32 + 12 * exp / (32 // 8))
    assert mem["weights"] == pytest.approx(2 * par["per_gpu"]) and mem["gradients"] == pytest.approx(4 * par["per_gpu"])
    assert mem["expert_states"] == pytest.approx((2 + 4) * exp + 12 * exp / 4)


def test_moe_all_to_all_volume():
    """Per GPU and step: 4 (dispatch + combine, forward + backward) x k copies x h x bf16 x the
    share of copies on other ranks (ep - 1) / ep, per MoE layer and token; none at ep 1."""
    cfg = _cfg("configs/moe_7b_a1b.yaml")
    a2a = _plan(cfg, gpus=32, vocab=157184)["all_to_all"]
    tokens = 1024 * 4096 / 32
    assert a2a["bytes_per_step"] == pytest.approx(4 * 8 * 2048 * 2 * 7 / 8 * 16 * tokens)
    assert _plan(_cfg("configs/tiny_moe.yaml"), vocab=8192)["all_to_all"]["bytes_per_step"] == 0


def test_moe_flops_count_active_parameters_and_mfu_uses_them():
    """tiny_moe routes each token through 2 experts of 352 units: the same 704 SwiGLU units per
    layer as tiny.yaml's dense MLP, so its FLOPs per token exceed tiny's only by the router
    (6 x E x h per layer), in the planner and in the trainer's MFU alike."""
    from dlm_megatron.train import flops_per_token

    moe, dense = _cfg("configs/tiny_moe.yaml"), _cfg("configs/tiny.yaml")
    router = 6 * 4 * 8 * 256
    assert _plan(moe)["flops_per_token"] == pytest.approx(_plan(dense)["flops_per_token"] + router, rel=1e-12)
    for on_gpu in (True, False):
        assert flops_per_token(moe, 8192, 128, on_gpu=on_gpu) == pytest.approx(
            _plan(moe, on_gpu=on_gpu)["flops_per_token"], rel=1e-12)
    text = __import__("dlm_megatron.planner", fromlist=["format_plan"]).format_plan(_plan(moe))
    assert "mixture of experts: 4 MoE layers x 8 experts (top-2)" in text and "all-to-all per GPU" in text


def test_moe_ep_must_divide_dp():
    with pytest.raises(PlanError, match="parallel.ep=8 does not divide the data-parallel size 4"):
        _plan(_cfg("configs/moe_7b_a1b.yaml"), gpus=4, vocab=157184)
