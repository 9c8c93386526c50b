"""Training entry point: ``python -m dlm_megatron.train CONFIG [key=value ...]`` (``dlm-train``).

Rerunning the same command resumes from ``<train.output_dir>/checkpoints/latest`` with the
same data order, noise and optimizer state: data order and noise are pure functions of
(seed, step, sample position), the LR is a pure function of the step, and the engine
restores weights and optimizer moments.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, describe, dump_yaml, load_config, to_dict

USAGE = """usage: python -m dlm_megatron.train CONFIG [section.key=value ...]

Train a diffusion language model. CONFIG is a YAML preset (configs/tiny.yaml, ...);
overrides use dotted keys, e.g. train.steps=100 parallel.tp=2 logging.wandb=disabled.
Launch several processes with torchrun (or launch/local.sh with NPROC=N).
Rerunning the same command resumes from <train.output_dir>/checkpoints/latest.

Config keys:
"""


def quiet_warnings() -> None:
    """megatron-core warns at import that TE/apex are absent; that is expected on CPU."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")


class StopRequest:
    """Set by SIGUSR1/SIGTERM (Slurm preemption): finish the step, checkpoint, exit."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


EXIT_PREEMPTED = 3


def flops_per_token(cfg: Config, vocab: int, seq_len: int, on_gpu: bool | None = None) -> float:
    """Training FLOPs per data token: 6 * matmul params + attention (12 * layers * h * s, times
    the share of pairs the attention kernel executes); doubled (with s = 2L) for block
    diffusion, whose model input is 2L tokens. Under FlexAttention only the non-empty tiles
    of the 2L mask count (see planner.attention_fraction and docs/planner.md)."""
    m = cfg.model
    from .config import ffn_size
    from .planner import attention_fraction

    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    h, L = m.hidden_size, m.num_layers
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * ffn_size(m)
    matmul = L * per_layer + vocab * h
    frac = attention_fraction(cfg, on_gpu)
    if cfg.diffusion.objective == "block":
        # The model runs on x_t and x_0 (2L tokens, attention span 2L) per L data tokens.
        s = 2 * seq_len
        return 2.0 * (6.0 * matmul + 12.0 * L * h * s * frac)
    return 6.0 * matmul + 12.0 * L * h * seq_len * frac


# Dense tensor-core peaks from NVIDIA's datasheets, TFLOP/s without sparsity:
# (name substring, bf16, fp32 without TF32). Longest match wins ("H100 PCIe" before "H100").
_PEAKS = (
    ("H200 NVL", 835.0, 60.0), ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0), ("H100", 989.0, 67.0),
    ("GH200", 989.0, 67.0), ("B200", 2250.0, 80.0), ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6), ("A10", 125.0, 31.2),
)


def peak_flops(device, bf16: bool = True) -> float | None:
    """Datasheet peak FLOP/s of one device at the run's precision, for MFU; None where there
    is no defensible peak (CPUs, unknown cards), so no MFU is reported. DLM_PEAK_TFLOPS
    overrides (e.g. a measured GEMM peak)."""
    if os.environ.get("DLM_PEAK_TFLOPS"):
        return float(os.environ["DLM_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tf_bf16, tf_fp32 in sorted(_PEAKS, key=lambda e: -len(e[0])):
        if key in name:
            return (tf_bf16 if bf16 else tf_fp32) * 1e12
    return None


def memory_gib(device) -> dict:
    """Peak memory of this process: CUDA allocator peaks (allocated and reserved) on GPU,
    peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    try:
        import resource

        return {"mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except Exception:
        return {}


# Model fields whose mismatch with a train.init_from source would silently drop or misuse
# weights (shape mismatches are caught when slicing the state dict).
_INIT_FROM_STRUCTURAL = ("add_qkv_bias", "tie_embeddings")
# Fields a user may change on purpose when continuing from other weights (e.g. a larger RoPE
# base for context extension): warned about, not refused.
_INIT_FROM_NUMERIC = ("rotary_base", "norm_epsilon")


def check_init_from(cfg: Config, meta: dict, path, *, warn: bool = True) -> None:
    """Refuse a train.init_from source whose architecture differs structurally from ``cfg``."""
    src = meta.get("config", {}).get("model", {})
    for key in _INIT_FROM_STRUCTURAL:
        if key in src and bool(src[key]) != bool(getattr(cfg.model, key)):
            raise ConfigError(f"train.init_from={path} was saved with model.{key}={str(src[key]).lower()} but this run has "
                              f"model.{key}={str(getattr(cfg.model, key)).lower()}; set model.{key}={str(src[key]).lower()}")
    for key in _INIT_FROM_NUMERIC:
        if warn and key in src and float(src[key]) != float(getattr(cfg.model, key)):
            print(f"warning: train.init_from={path} was trained with model.{key}={src[key]}, this run uses "
                  f"{getattr(cfg.model, key)}", flush=True)


def run(cfg: Config) -> dict:
    """Train according to ``cfg``; returns a summary dict (on every rank)."""
    quiet_warnings()
    import torch
    import torch.distributed as dist

    from . import checkpoint as ckpt
    from .data import DataError
    from .data.corpus import resolve_data_path
    from .data.loader import PackedDataset, build_train_dataset, sample_indices
    from .data.tokenizer import load_tokenizer
    from .diffusion.objectives import build_objective
    from .logging import MetricsLogger
    from .model.denoiser import build_model, canonical_params, init_weights
    from .parallel import comm
    from .parallel import dist as pdist

    stop = StopRequest()
    lay = pdist.init_distributed(cfg)
    rank0 = lay.rank == 0
    out = Path(cfg.train.output_dir)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        for name in ckpt.clean_stale(out):  # before any rank can save (the barrier below)
            print(f"cleaned up {name} left by an interrupted save", flush=True)
    torch.manual_seed(cfg.train.seed)

    tok = load_tokenizer(cfg.data.tokenizer)
    # Rank 0 tokenizes builtin corpora first; the others then find them ready.
    paths = {}
    for split, p in (("train", cfg.data.train_path), ("val", cfg.data.val_path)):
        if p is None:
            continue
        if rank0:
            paths[split] = resolve_data_path(p, cfg.data.cache_dir, tok)
    dist.barrier()
    if not rank0:
        paths = {s: resolve_data_path(p, cfg.data.cache_dir, tok) for s, p in (("train", cfg.data.train_path), ("val", cfg.data.val_path)) if p is not None}
    train_ds = build_train_dataset(cfg, tok, cfg.data.cache_dir)  # PackedDataset, or BlendedDataset for "0.7:dirA,0.3:dirB"
    val_ds = PackedDataset(paths["val"], cfg.data.seq_len, tok.eot_id, tokenizer_sha=tok.sha256) if "val" in paths else None
    if cfg.data.sft_path:  # SFT: prompt/response examples (data/sft.py) instead of packed text
        from .data.sft import SFTDataset

        train_ds = SFTDataset(cfg.data.sft_path, tok, cfg.data.seq_len, cfg.data.chat_template)
        val_ds = SFTDataset(cfg.data.sft_val_path, tok, cfg.data.seq_len, cfg.data.chat_template) if cfg.data.sft_val_path else None

    vocab = cfg.model.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and lay.device.type == "cuda")
    model = build_model(cfg, vocab, pre_process=lay.is_first_stage, post_process=lay.is_last_stage,
                        params_dtype=model_params_dtype(cfg, bf16))
    model.to(lay.device)
    init_weights(model, cfg, tp_rank=lay.tp_rank, pp_rank=lay.pp_rank)  # drawn on the device
    latest = ckpt.latest_checkpoint(out)
    weights_from = None
    if latest is not None and ckpt.read_meta(latest).get("engine") is None:
        weights_from = latest  # e.g. resharded offline: weights only, optimizer restarts
    elif latest is None and cfg.train.init_from:
        weights_from = ckpt.resolve(cfg.train.init_from)
        check_init_from(cfg, ckpt.read_meta(weights_from), weights_from, warn=rank0)
    if weights_from is not None:
        # Before the engine exists: ZeRO-3 partitions parameters at initialisation.
        full = ckpt.load_full_state_dict(weights_from)
        model.load_state_dict(ckpt.local_state_from_full(full, model, cfg, tp_rank=lay.tp_rank, pp_rank=lay.pp_rank), strict=False)
        if rank0:
            print(f"initialised weights from {weights_from} (fresh optimizer state)", flush=True)
    engine = build_engine(model, cfg, lay, bf16)
    from megatron.core import parallel_state

    # uniform/hybrid: noise draws from the tokenizer's ids, the loss sums over vocab-parallel logits
    objective = build_objective(cfg.diffusion, tok.mask_id, cfg.train.seed, vocab_size=tok.vocab_size,
                                tp_group=parallel_state.get_tensor_model_parallel_group() if lay.tp > 1 else None,
                                tp_rank=lay.tp_rank, tp_size=lay.tp)
    if cfg.data.sft_path:
        from .diffusion.objectives import SFTMaskedDiffusion

        objective = SFTMaskedDiffusion(cfg.diffusion, tok.mask_id, cfg.train.seed)

    G, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_rank = G // lay.dp
    start_step = 0
    if latest is not None and weights_from is latest:
        start_step = ckpt.read_meta(latest)["step"]
    elif latest is not None:
        meta = ckpt.read_meta(latest)
        if meta.get("engine") != engine_name(cfg):
            raise ConfigError(f"{latest} was written by the {meta.get('engine')} engine but this layout uses {engine_name(cfg)}; "
                              f"convert the checkpoint or keep parallel.pp as it was")
        saved = meta.get("layout", {})
        if (saved.get("tp"), saved.get("pp")) != (lay.tp, lay.pp):
            raise ConfigError(f"{latest} was written at tp={saved.get('tp')} pp={saved.get('pp')} but this run uses tp={lay.tp} pp={lay.pp}; "
                              f"reshard it first: python tools/convert.py reshard --ckpt {latest} --output NEW_RUN --tp {lay.tp} --pp {lay.pp}")
        if saved.get("zero_stage") != cfg.parallel.zero_stage or (
                engine_name(cfg) == "deepspeed" and cfg.parallel.zero_stage >= 1 and saved.get("dp") != lay.dp):
            raise ConfigError(f"{latest} holds DeepSpeed ZeRO-{saved.get('zero_stage')} optimizer state for dp={saved.get('dp')}; "
                              f"resume with parallel.zero_stage={saved.get('zero_stage')} and {saved.get('dp')} data-parallel ranks "
                              f"(ZeRO-0 and pipeline-engine checkpoints resume at any DP size)")
        if engine_name(cfg) == "megatron":
            full = ckpt.load_full_state_dict(latest)
            local = ckpt.local_state_from_full(full, engine.module, cfg, tp_rank=lay.tp_rank, pp_rank=lay.pp_rank)
            engine.load(str(latest / "engine"), "engine", model_state=local)
        else:
            engine.load(str(latest / "engine"), "engine")
        start_step = meta["step"]
        if rank0:
            print(f"resumed from {latest} at step {start_step}", flush=True)

    logger = MetricsLogger(cfg, out, is_rank0=rank0, config_dict=to_dict(cfg))
    fpt = flops_per_token(cfg, vocab, cfg.data.seq_len, on_gpu=lay.device.type == "cuda")
    peak = peak_flops(lay.device, bf16)
    if rank0 and start_step == 0:
        n_params = sum(p.numel() for p in model.parameters())
        from .model.attention import CoreAttention

        kernels = sorted({m.backend for m in model.modules() if isinstance(m, CoreAttention)}) or ["transformer_engine"]
        print(f"model: {n_params / 1e6:.2f}M parameters on this rank | {lay.device.type} {str(next(model.parameters()).dtype)[6:]} "
              f"params{' + bf16 autocast' if bf16 and next(model.parameters()).dtype != torch.bfloat16 else ''} | "
              f"attention {','.join(kernels)} | layout tp={lay.tp} pp={lay.pp} dp={lay.dp} engine={engine_name(cfg)} "
              f"zero={cfg.parallel.zero_stage} | objective={cfg.diffusion.objective} | "
              f"train samples {len(train_ds)} x {cfg.data.seq_len} tokens", flush=True)

    def micro_batches(step: int, x_GL: np.ndarray, positions_G: np.ndarray, eval: bool = False, seg_GL: np.ndarray | None = None):
        lo = lay.dp_rank * per_rank
        xs = torch.from_numpy(x_GL[lo: lo + per_rank])
        ps = torch.from_numpy(positions_G[lo: lo + per_rank])
        for i in range(0, per_rank, mbs):
            b = objective.make_batch(xs[i: i + mbs], ps[i: i + mbs], step=step, global_batch_size=G, eval=eval)
            if seg_GL is not None:
                # Packed documents must not see each other: block attention across <|endoftext|>.
                from .data.loader import with_document_mask

                b.attention_mask = with_document_mask(b.attention_mask, seg_GL[lo + i: lo + i + mbs],
                                                      b.tokens_BS.shape[1], causal=objective.causal)
            yield b

    loss_fn = LossFn(lay.device)
    from megatron.core import parallel_state as ps

    dp_group = ps.get_data_parallel_group()

    pp_group = ps.get_pipeline_model_parallel_group()

    def pp_share(x: float) -> float:
        """Losses exist on the last pipeline stage only; give every stage its value."""
        if lay.pp == 1:
            return x
        return comm.sum_host(x if lay.is_last_stage else 0.0, pp_group)

    def dp_mean(x: float) -> float:
        return comm.sum_host(x, dp_group) / lay.dp

    def evaluate(step: int) -> dict | None:
        if val_ds is None:
            return None
        engine.eval()
        total, count = 0.0, 0
        loss_fn.collect = []  # per-sequence losses and t, for the per-noise-level buckets
        eval_seed = 0  # fixed: every run evaluates the same samples with the same noise
        with torch.no_grad():
            for k in range(cfg.train.eval_batches):
                idx = sample_indices(k, G, len(val_ds), eval_seed)
                x = np.stack([val_ds[int(i)] for i in idx])
                pos = np.arange(k * G, (k + 1) * G, dtype=np.int64)
                # validation sees documents as training does: no attention across them
                seg = np.stack([val_ds.segment_ids(int(i)) for i in idx]) if cfg.data.document_masks else None
                mbl = list(micro_batches(k, x, pos, eval=True, seg_GL=seg))
                vals = engine.forward_only(mbl, loss_fn, seq_len=mbl[0].tokens_BS.shape[1], micro_batch_size=mbs)
                for b, v in zip(mbl, vals):
                    total += float(v) * b.num_tokens
                    count += b.num_tokens
        engine.train()
        collected, loss_fn.collect = loss_fn.collect, None
        loss = dp_mean(pp_share(total / max(count, 1)))
        row = {"step": step, "split": "val", "loss": loss, "ppl_bound": math.exp(min(loss, 50.0))}
        if not objective.causal:
            row.update(bucket_losses(collected, pp_group if lay.pp > 1 else None, dp_group, device=lay.device))
        return row

    def save(step: int) -> None:
        tmp = ckpt.begin_save(out, step)
        if rank0:
            ckpt.prepare_tmp(tmp)
        dist.barrier()
        named = list(canonical_params(engine.module, cfg, lay.pp_rank))
        if cfg.parallel.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                if lay.dp_rank == 0:
                    ckpt.save_model_shard(tmp, named, lay.tp_rank, lay.pp_rank)
        elif lay.dp_rank == 0:
            ckpt.save_model_shard(tmp, named, lay.tp_rank, lay.pp_rank)
        engine.save(str(tmp / "engine"), "engine", {"step": step})
        dist.barrier()
        if rank0:
            meta = {"config": to_dict(cfg), "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": cfg.parallel.zero_stage},
                    "tokenizer_sha256": tok.sha256, "vocab_size": vocab, "consumed_samples": step * G, "engine": engine_name(cfg)}
            final = ckpt.commit_save(out, tmp, step, meta, cfg.train.keep_last)
            print(f"saved checkpoint {final}", flush=True)
        dist.barrier()

    # Test hooks: poison the loss, or only its gradient, at given steps; behave as if
    # preempted after a given step.
    inject_nan = {int(s) for s in os.environ.get("DLM_TEST_INJECT_NAN_STEPS", "").split(",") if s.strip()}
    inject_nan_grad = {int(s) for s in os.environ.get("DLM_TEST_INJECT_NAN_GRAD_STEPS", "").split(",") if s.strip()}
    stop_at = int(os.environ.get("DLM_TEST_STOP_AT_STEP", "-1"))
    bad_in_a_row = 0
    last = {}
    engine.train()
    t_last = time.time()
    tokens_since = 0
    step = start_step
    for step in range(start_step, cfg.train.steps):
        idx = sample_indices(step, G, len(train_ds), cfg.train.seed)
        lo = lay.dp_rank * per_rank
        x = np.zeros((G, getattr(train_ds, "sample_width", cfg.data.seq_len)), dtype=np.int64)
        x[lo: lo + per_rank] = np.stack([train_ds[int(i)] for i in idx[lo: lo + per_rank]])
        positions = np.arange(step * G, (step + 1) * G, dtype=np.int64)
        lr = engine.set_lr(step)
        seg = None
        if cfg.data.document_masks:
            seg = np.zeros((G, cfg.data.seq_len), np.int32)
            seg[lo: lo + per_rank] = np.stack([train_ds.segment_ids(int(i)) for i in idx[lo: lo + per_rank]])
        mbl = list(micro_batches(step, x, positions, seg_GL=seg))
        losses, grad_norm, bad = engine.train_step(mbl, loss_fn, seq_len=mbl[0].tokens_BS.shape[1], micro_batch_size=mbs,
                                                   poison="loss" if step in inject_nan else "grad" if step in inject_nan_grad else None)
        tokens_since += sum(b.num_tokens for b in mbl) * lay.dp
        if bad:
            bad_in_a_row += 1
            if rank0:
                print(f"warning: non-finite loss or gradient at step {step}; update skipped ({bad_in_a_row}/{cfg.train.max_bad_steps} in a row)", flush=True)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                msg = (f"stopping: {bad_in_a_row} non-finite steps (loss or gradient) in a row (last good checkpoint kept in {out / 'checkpoints'}); "
                       f"lower train.lr or check the data")
                logger.close()
                raise TrainingDiverged(msg)
            continue
        bad_in_a_row = 0
        done = step + 1
        if done % cfg.logging.log_interval == 0 or done == cfg.train.steps:
            loss_v = dp_mean(pp_share(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in losses]).mean().item()))
            dt = max(time.time() - t_last, 1e-9)
            tps = tokens_since / dt
            row = {"step": done, "loss": loss_v, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tps,
                   **({"mfu": tps * fpt / (peak * lay.world_size)} if peak else {}), **memory_gib(lay.device)}
            logger.log(row)
            last = row
            t_last, tokens_since = time.time(), 0
        if cfg.train.eval_interval and done % cfg.train.eval_interval == 0 and done != cfg.train.steps:
            r = evaluate(done)
            if r:
                logger.log(r)
        preempted = stop.signum is not None or done == stop_at
        # one rank's signal stops all of them at the same step (one tiny all-reduce per step)
        if comm.max_host(1.0 if preempted else 0.0) > 0:
            save(done)
            if rank0:
                print(f"received stop signal: checkpoint saved at step {done}, exiting for requeue", flush=True)
            logger.close()
            raise Preempted(done)
        if cfg.train.save_interval and done % cfg.train.save_interval == 0 and done != cfg.train.steps:
            save(done)

    final_step = cfg.train.steps
    if start_step < final_step and cfg.train.save_at_end:
        save(final_step)
    val = evaluate(final_step)
    if val:
        logger.log(val)
    summary = {"final": last, "val": val, "output_dir": str(out)}
    if cfg.train.sample_at_end and rank0 and lay.tp == 1 and lay.pp == 1:
        from .generate import sample_text

        text = sample_text(engine.module, tok, cfg, device=lay.device)
        print("---- sample ----\n" + text + "\n----------------", flush=True)
        summary["sample"] = text
    logger.close()
    return summary


NUM_T_BUCKETS = 10


def bucket_losses(collected: list, pp_group, dp_group, num_buckets: int = NUM_T_BUCKETS, device=None) -> dict:
    """Validation loss per noise-level bucket t in [k/n, (k+1)/n): keys ``loss_t0.0-0.1`` ...

    ``collected`` holds (per-sequence loss [B], t [B]) pairs (empty on non-last pipeline
    stages); sums and counts are all-reduced over the pipeline and data-parallel groups so
    every rank returns the same dict. Empty buckets are left out. Each bucket's mean is the
    ELBO integrand averaged over that slice of t (the bound is their mean for uniform t).
    """
    import torch

    from .parallel import comm

    acc = torch.zeros(2, num_buckets, dtype=torch.float64)
    for loss_B, t_B in collected:
        ok = (t_B >= 0) & (t_B <= 1)  # t_B outside [0, 1] (e.g. continuous diffusion's sigma) is not bucketed
        k = torch.clamp((t_B[ok] * num_buckets).long(), 0, num_buckets - 1)
        acc[0].index_add_(0, k, loss_B[ok])
        acc[1].index_add_(0, k, torch.ones_like(loss_B[ok]))
    if pp_group is not None:
        acc = comm.all_reduce_host(acc, "sum", pp_group)
    acc = comm.all_reduce_host(acc, "sum", dp_group)
    out = {}
    for k in range(num_buckets):
        if acc[1, k] > 0:
            out[f"loss_t{k / num_buckets:.1f}-{(k + 1) / num_buckets:.1f}"] = (acc[0, k] / acc[1, k]).item()
    return out


class TrainingDiverged(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after the stop-signal checkpoint; entry points exit with EXIT_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(f"preempted after step {step}")
        self.step = step


class LossFn:
    """The objective's loss in megatron's forward_step contract: ``forward`` runs the model
    on a Batch (on a middle pipeline stage it returns hidden states), ``reduce`` turns the
    last stage's per-token NLL into the weighted loss."""

    def __init__(self, device):
        self.device = device
        self.collect: list | None = None
        """When a list, ``reduce`` appends (per-sequence loss [B], t [B]) for each micro-batch."""

    def _dev(self, t):
        return None if t is None else t.to(self.device, non_blocking=True)

    def forward(self, model, b):
        labels = None if getattr(b, "logits_loss", None) is not None else self._dev(b.labels_BS)
        extra = {k: self._dev(v) for k, v in (getattr(b, "model_kwargs", None) or {}).items()}
        return model(self._dev(b.tokens_BS), self._dev(b.position_ids_BS), self._dev(b.attention_mask),
                     labels=labels, explicit_positions=b.position_ids_BS is not None, **extra)

    def contributions(self, b, out):
        """Per-position weighted loss [B, S] (sum / num_tokens is the loss)."""
        if getattr(b, "logits_loss", None) is not None:
            return b.logits_loss(out, b)
        import torch

        w = self._dev(b.loss_weight_BS)
        return torch.where(w != 0, out.float() * w, torch.zeros_like(w))

    def per_sequence(self, b, out):
        """Per-sequence loss [B] on the same scale as the batch loss (mean over rows = loss)."""
        c = self.contributions(b, out)
        return c.sum(dim=1) * (c.shape[0] / b.num_tokens)

    def reduce(self, b, nll):
        from .diffusion.masked import weighted_token_loss

        if self.collect is not None:  # evaluation: remember per-sequence losses and t (noise-level buckets)
            self.collect.append((self.per_sequence(b, nll).detach().double().cpu(), b.t_B.detach().double().cpu()))
        if getattr(b, "logits_loss", None) is not None:
            loss = b.logits_loss(nll, b).sum() / b.num_tokens
            return loss, {"loss": loss.detach().clone()}
        loss = weighted_token_loss(nll, self._dev(b.loss_weight_BS), b.num_tokens)
        # clone: megatron's schedule divides the returned loss in place by num_microbatches
        return loss, {"loss": loss.detach().clone()}


def engine_name(cfg: Config) -> str:
    """Which engine a layout uses: ``parallel.engine``, where ``auto`` is megatron-core's
    DDP + distributed optimizer for PP>1 and DeepSpeed otherwise."""
    if cfg.parallel.engine != "auto":
        return cfg.parallel.engine
    return "megatron" if cfg.parallel.pp > 1 else "deepspeed"


def model_params_dtype(cfg: Config, bf16: bool):
    """dtype the model's parameters are built in: bf16 where the engine keeps bf16 weights
    with fp32 master copies (megatron-core always; DeepSpeed at ZeRO >= 1); fp32 otherwise
    (fp32 runs, and DeepSpeed ZeRO-0 whose bf16 mode is autocast over fp32 weights)."""
    import torch

    if not bf16:
        return torch.float32
    if engine_name(cfg) == "megatron":
        return torch.bfloat16
    from .engine.deepspeed_engine import params_dtype

    return params_dtype(cfg, bf16)


def build_engine(model, cfg: Config, lay, bf16: bool):
    if engine_name(cfg) == "megatron":
        if cfg.parallel.zero_stage not in (0, 1):
            raise ConfigError(f"parallel.engine=megatron (used for parallel.pp>1) with parallel.zero_stage={cfg.parallel.zero_stage} is not supported: "
                              f"it shards optimizer states with megatron-core's distributed optimizer (ZeRO-1 equivalent); set parallel.zero_stage=1")
        from .engine.megatron_engine import MegatronEngine

        return MegatronEngine(model, cfg, dp=lay.dp, bf16=bf16)
    from .engine.deepspeed_engine import DeepSpeedEngine
    from .parallel import dist as pdist

    return DeepSpeedEngine(model, cfg, dp=lay.dp, bf16=bf16, mpu=pdist.DeepSpeedMPU())


def main(argv: list[str] | None = None) -> int:
    quiet_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + describe())
        return 0 if argv else 2
    config_path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    try:
        cfg = load_config(config_path, overrides)
        run(cfg)
    except Preempted:
        return EXIT_PREEMPTED
    except (ConfigError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # data/checkpoint problems are ValueErrors phrased for users
        from .checkpoint import CheckpointError
        from .data import DataError

        if isinstance(e, (DataError, CheckpointError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        if "megatron.core" in sys.modules:  # only if we got as far as starting it
            try:
                from .parallel import dist as pdist

                pdist.destroy()
            except Exception:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
