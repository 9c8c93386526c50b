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
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, describe, dump_yaml, load_config, to_dict
from .engine import ZERO_STATE_FORMAT, TrainingDiverged  # TrainingDiverged: also re-exported
from .logging import quiet_warnings  # noqa: F401  (re-exported: scripts import it from here)

USAGE = """usage: python -m dlm_megatron.train CONFIG [section.key=value ...]

Train a diffusion language model. CONFIG is a YAML preset (configs/tiny.yaml, ...);
overrides use dotted keys, e.g. train.steps=100 parallel.tp=2 logging.wandb=disabled.
Launch several processes with torchrun (or launch/local.sh with NPROC=N).
Rerunning the same command resumes from <train.output_dir>/checkpoints/latest.

Config keys:
"""


class StopRequest:
    """Set by SIGUSR1/SIGTERM (Slurm preemption): finish the step, checkpoint, exit."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


EXIT_PREEMPTED = 3


def mlp_active_params(m) -> int:
    """MLP weights one token passes through, summed over layers: dense SwiGLU layers, and in MoE
    layers its top-k routed experts, the shared expert and the router (active parameters)."""
    from .config import ffn_size, moe_ffn_size, moe_layer_pattern

    h = m.hidden_size
    pattern = moe_layer_pattern(m) or [0] * m.num_layers
    moe = (m.moe_router_topk * 3 * h * moe_ffn_size(m) + 3 * h * m.moe_shared_expert_intermediate_size
           + h * (m.num_moe_experts or 0))
    return sum(moe if is_moe else 3 * h * ffn_size(m) for is_moe in pattern)


def flops_per_token(cfg: Config, vocab: int, seq_len: int, on_gpu: bool | None = None) -> float:
    """Training FLOPs per data token, counted as executed: 6 * matmul params (MoE: active ones,
    see mlp_active_params; the output layer
    times the share of positions it runs on) + attention (12 * layers * heads * head_dim * s, times the share
    of pairs the attention kernel executes); doubled (with s = 2L) for block diffusion, whose
    model input is 2L tokens. See planner.output_fraction / attention_fraction and docs/planner.md."""
    m = cfg.model
    from .planner import attention_fraction, attention_matrix_params, model_dims, output_fraction

    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    h, L = m.hidden_size, m.num_layers
    dm = model_dims(cfg, vocab)
    q = dm.q_dim  # heads x head width: h unless model.kv_channels is set (Qwen3)
    matmul = L * attention_matrix_params(dm) + mlp_active_params(m) + vocab * h * output_fraction(cfg)
    frac = attention_fraction(cfg, on_gpu)
    if cfg.diffusion.objective == "block":
        # The model runs on x_t and x_0 (2L tokens, attention span 2L) per L data tokens.
        s = 2 * seq_len
        return 2.0 * (6.0 * matmul + 12.0 * L * q * s * frac)
    return 6.0 * matmul + 12.0 * L * q * seq_len * frac


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
    """Memory of this process: CUDA allocator peaks (allocated and reserved) and what is
    allocated now on GPU; peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        # mem_now_gib: allocated between steps (weights, gradients, optimizer states and
        # buffers; activations are freed), so mem_gib - mem_now_gib is the step's working set
        return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                "mem_now_gib": torch.cuda.memory_allocated(device) / 2**30}
    try:
        import resource

        return {"mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except Exception:
        return {}


def check_dense_attention_fits(cfg: Config, model, *, gpus: int, vocab: int, device_bytes: int) -> None:
    """Refuse, in one line, a model whose attention runs the dense kernel (megatron-core's
    unfused attention: the s x s scores of every head in memory) when the planner says the
    layout does not fit the device. Fused kernels (sdpa, flex, TE) are never refused here."""
    from .model.attention import CoreAttention
    from .planner import GIB, plan

    if not any(isinstance(m, CoreAttention) and m.backend == "dense" for m in model.modules()):
        return
    p = plan(cfg, gpus=gpus, gpu_mem_gib=device_bytes / GIB, vocab_size=vocab, on_gpu=True)
    mem = p["memory"]
    if not mem["fits"]:
        raise ConfigError(f"model.attention_backend=dense keeps the s x s attention scores: the planner puts this layout at "
                          f"{mem['total'] / GIB:.1f} GiB per GPU, more than the {device_bytes / GIB:.1f} GiB here; "
                          f"use model.attention_backend=sdpa (flex for block diffusion) or a smaller train.micro_batch_size")


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


class Trainer:
    """One training run: ``Trainer(cfg)`` builds everything (process groups, data, model,
    engine, objective; resumes from ``latest``), ``fit()`` trains. Each GPU concern has one
    home: collectives in parallel/comm.py, precision in ``model_params_dtype`` and the
    engines, kernels in model/attention.py, host syncs once per step in ``train_step``."""

    def __init__(self, cfg: Config):
        import torch

        from . import checkpoint as ckpt
        from .parallel import dist as pdist

        self.cfg = cfg
        self.stop = StopRequest()
        self.lay = lay = pdist.init_distributed(cfg)
        self.rank0 = lay.rank == 0
        self.out = Path(cfg.train.output_dir)
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
            for name in ckpt.clean_stale(self.out):  # before any rank can save (the barrier in _build_data)
                print(f"cleaned up {name} left by an interrupted save", flush=True)
        from .saving import AsyncSaver

        self.saver = AsyncSaver(self.out, rank0=self.rank0, background=cfg.train.async_save, keep_last=cfg.train.keep_last)
        torch.manual_seed(cfg.train.seed)
        self.G, self.mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
        self.per_rank = self.G // lay.dp
        self._build_data()
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and lay.device.type == "cuda")
        latest = ckpt.latest_checkpoint(self.out)
        self._build_model(latest)
        if lay.device.type == "cuda":
            import torch

            check_dense_attention_fits(cfg, self.model, gpus=lay.world_size, vocab=self.vocab,
                                       device_bytes=torch.cuda.get_device_properties(lay.device).total_memory)
        self.engine = build_engine(self.model, cfg, lay, self.bf16)
        self._build_objective()
        self.start_step = self._resume(latest)
        from megatron.core import parallel_state as ps

        from .logging import MetricsLogger

        self.dp_group, self.pp_group = ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()
        self.loss_fn = LossFn(lay.device)
        from .model.moe import RouterLoad

        self.router_load = RouterLoad(self.engine.module) if cfg.model.num_moe_experts else None
        self.moe_steps = 0  # optimizer steps whose routing the next metrics row summarises
        self.logger = MetricsLogger(cfg, self.out, is_rank0=self.rank0, config_dict=to_dict(cfg))
        self.fpt = flops_per_token(cfg, self.vocab, cfg.data.seq_len, on_gpu=lay.device.type == "cuda")
        self._fpt_at: dict[int, float] = {}
        self.peak = peak_flops(lay.device, self.bf16)
        # Test hooks: poison the loss (on every rank, or its value on the last DP rank only) or
        # only its gradient at given steps (engine/poison.py); behave as if preempted after a step.
        self.inject = {kind: {int(s) for s in os.environ.get(var, "").split(",") if s.strip()}
                       for kind, var in (("loss", "DLM_TEST_INJECT_NAN_STEPS"), ("grad", "DLM_TEST_INJECT_NAN_GRAD_STEPS"),
                                         ("loss_last_rank", "DLM_TEST_INJECT_NAN_LAST_RANK_STEPS"))}
        self.stop_at = int(os.environ.get("DLM_TEST_STOP_AT_STEP", "-1"))
        if self.rank0 and self.start_step == 0:
            print(self.describe(), flush=True)

    # -- build ----------------------------------------------------------------------------
    def _build_data(self) -> None:
        """Datasets and sample orders. Rank 0 opens them first (tokenizing builtin corpora and
        building the index cache, data/index_cache.py); the others then map what it wrote."""
        from .data.tokenizer import load_tokenizer
        from .parallel import dist as pdist

        cfg = self.cfg
        self.tok = tok = load_tokenizer(cfg.data.tokenizer)
        if self.rank0:
            self._open_datasets(build=True)
        pdist.barrier()
        if not self.rank0:
            self._open_datasets(build=False)
        self.vocab = cfg.model.vocab_size or tok.vocab_size
        if self.vocab < tok.vocab_size:
            raise ConfigError(f"model.vocab_size={self.vocab} is smaller than the tokenizer's vocabulary ({tok.vocab_size})")

    def _open_datasets(self, build: bool) -> None:
        from .data.corpus import resolve_data_path
        from .data.index_cache import IndexCache
        from .data.loader import PackedDataset, SampleOrder, build_train_dataset

        cfg, tok, t0 = self.cfg, self.tok, time.time()
        cache = IndexCache(cfg.data.cache_dir, build=build)
        val = resolve_data_path(cfg.data.val_path, cfg.data.cache_dir, tok) if cfg.data.val_path is not None else None
        self.train_ds = build_train_dataset(cfg, tok, cfg.data.cache_dir, index_cache=cache)  # PackedDataset, or BlendedDataset for "0.7:dirA,0.3:dirB"
        self.val_ds = PackedDataset(val, cfg.data.seq_len, tok.eot_id, tokenizer_sha=tok.sha256, index_cache=cache) if val else None
        if cfg.data.sft_path:  # SFT: prompt/response examples (data/sft.py) instead of packed text
            from .data.sft import SFTDataset, pad_multiple

            # data.sft_padding=batch: each global batch is padded to its longest example (data/sft.py)
            pad = pad_multiple(cfg.diffusion.objective, cfg.diffusion.block_size) if cfg.data.sft_padding == "batch" else None
            if pad and cfg.parallel.sequence_parallel:
                pad = math.lcm(pad, cfg.parallel.tp)  # each TP rank holds length/tp positions (8 already for tp 2/4/8)
            self.train_ds = SFTDataset(cfg.data.sft_path, tok, cfg.data.seq_len, cfg.data.chat_template, pad)
            self.val_ds = SFTDataset(cfg.data.sft_val_path, tok, cfg.data.seq_len, cfg.data.chat_template, pad) if cfg.data.sft_val_path else None
            cache = None  # a JSONL of examples held in memory: nothing to map
        # the epochs this run reads are built now, so no rank waits for one mid-run
        self.train_order = SampleOrder(len(self.train_ds), cfg.train.seed, cache, cfg.train.steps * self.G)
        # validation: fixed samples (seed 0) whatever the run's seed
        self.val_order = SampleOrder(len(self.val_ds), 0, cache, cfg.train.eval_batches * self.G) if self.val_ds is not None else None
        if build and cache is not None and self.rank0:
            print(f"data index: built {len(cache.built)}, mapped {len(cache.opened) - len(cache.built)} cached entries "
                  f"in {cache.root} ({time.time() - t0:.1f}s)", flush=True)

    def _build_model(self, latest) -> None:
        """This rank's model on its device, initialised from (seed, name), or from a weights-only
        checkpoint / train.init_from (before the engine: ZeRO-3 partitions at initialisation)."""
        from . import checkpoint as ckpt
        from .model.denoiser import build_model, init_weights

        cfg, lay = self.cfg, self.lay
        self.model = model = build_model(cfg, self.vocab, pre_process=lay.is_first_stage, post_process=lay.is_last_stage,
                                         params_dtype=model_params_dtype(cfg, self.bf16), pp_rank=lay.pp_rank)
        model.to(lay.device)
        init_weights(model, cfg, tp_rank=lay.tp_rank, pp_rank=lay.pp_rank, ep_rank=lay.ep_rank)  # drawn on the device
        self.weights_from = None
        if latest is not None and ckpt.read_meta(latest).get("engine") is None:
            self.weights_from = latest  # e.g. resharded offline: weights only, optimizer restarts
        elif latest is None and cfg.train.init_from:
            self.weights_from = ckpt.resolve(cfg.train.init_from)
            check_init_from(cfg, ckpt.read_meta(self.weights_from), self.weights_from, warn=self.rank0)
        if self.weights_from is not None:
            self._load_weights(model, self.weights_from)
            if self.rank0:
                print(f"initialised weights from {self.weights_from} (fresh optimizer state)", flush=True)
        elif latest is not None and ckpt.read_meta(latest).get("optimizer") == ZERO_STATE_FORMAT:
            self._load_weights(model, latest)  # the optimizer state follows once the engine exists (_resume)

    def _load_weights(self, model, path) -> None:
        """Load this rank's slice of the weights in checkpoint ``path`` (any layout), reading
        only that slice, and report the most any rank read."""
        from . import checkpoint as ckpt
        from .parallel import comm

        lay = self.lay
        state, reader = ckpt.load_local_state(path, model, self.cfg, tp_rank=lay.tp_rank, pp_rank=lay.pp_rank, ep_rank=lay.ep_rank)
        model.load_state_dict(state, strict=False)
        most = comm.max_host(float(reader.bytes_read))
        if self.rank0:
            print(f"weights: read at most {most / 2**20:.2f} MiB per rank of the model's {reader.total_bytes / 2**20:.2f} MiB "
                  f"({most / reader.total_bytes:.2f}) from {path}", flush=True)

    def _build_objective(self) -> None:
        from megatron.core import parallel_state

        from .diffusion.objectives import build_objective

        cfg, lay, tok = self.cfg, self.lay, self.tok
        # uniform/hybrid: noise draws from the tokenizer's ids, the loss sums over vocab-parallel logits
        self.objective = build_objective(cfg.diffusion, tok.mask_id, cfg.train.seed, vocab_size=tok.vocab_size,
                                         tp_group=parallel_state.get_tensor_model_parallel_group() if lay.tp > 1 else None,
                                         tp_rank=lay.tp_rank, tp_size=lay.tp, length_multiple=self._length_multiple())
        if cfg.data.sft_path:
            from .diffusion.objectives import SFTMaskedDiffusion

            self.objective = SFTMaskedDiffusion(cfg.diffusion, tok.mask_id, cfg.train.seed)
            self.objective.length_multiple = self._length_multiple()

    def _length_multiple(self) -> int:
        """What every training sequence length must be a multiple of: parallel.tp under
        sequence parallelism (megatron splits the sequence over the TP ranks), else 1."""
        return self.lay.tp if self.cfg.parallel.sequence_parallel else 1

    def _resume(self, latest) -> int:
        """The step to start from: a weights-only checkpoint's, or the engine's full state."""
        from . import checkpoint as ckpt

        cfg, lay, engine = self.cfg, self.lay, self.engine
        if latest is None:
            return 0
        meta = ckpt.read_meta(latest)
        if self.weights_from is latest:
            return meta["step"]
        if meta.get("engine") != engine_name(cfg):
            raise ConfigError(f"{latest} was written by the {meta.get('engine')} engine but this layout uses {engine_name(cfg)}; "
                              f"set parallel.engine={meta.get('engine')} (and the original parallel.pp) or convert the checkpoint")
        saved = meta.get("layout", {})
        # the project's own optimizer state: fragments under canonical names (global expert
        # indices), read at any DP and EP size; megatron-core's own state only at its EP size
        ours = meta.get("optimizer") == ZERO_STATE_FORMAT
        if saved.get("ep", 1) != lay.ep and not ours:
            raise ConfigError(f"{latest} was written at parallel.ep={saved.get('ep', 1)} but this run uses parallel.ep={lay.ep}; "
                              f"reshard it first: python tools/convert.py reshard --ckpt {latest} --output NEW_RUN --ep {lay.ep}")
        if (saved.get("tp"), saved.get("pp")) != (lay.tp, lay.pp):
            raise ConfigError(f"{latest} was written at tp={saved.get('tp')} pp={saved.get('pp')} but this run uses tp={lay.tp} pp={lay.pp}; "
                              f"reshard it first: python tools/convert.py reshard --ckpt {latest} --output NEW_RUN --tp {lay.tp} --pp {lay.pp}")
        if saved.get("zero_stage") != cfg.parallel.zero_stage:
            raise ConfigError(f"{latest} holds ZeRO-{saved.get('zero_stage')} optimizer state but this run uses "
                              f"parallel.zero_stage={cfg.parallel.zero_stage}; resume with parallel.zero_stage={saved.get('zero_stage')}")
        if ours:  # weights were loaded before the engine (_build_model)
            from .parallel import comm

            read, total = engine.load_state(latest / "optim", self._optimized(), tp_rank=lay.tp_rank, pp_rank=lay.pp_rank,
                                            step=meta["step"])
            most = comm.max_host(float(read))
            if self.rank0:
                print(f"optimizer state: read at most {most / 2**20:.2f} MiB per rank of its TP/PP slice's {total / 2**20:.2f} MiB "
                      f"(dp={lay.dp}, saved at dp={saved.get('dp')})", flush=True)
        elif engine_name(cfg) == "megatron":  # megatron-core's own (before ZERO_STATE_FORMAT): any DP size, it re-shards
            self._load_weights(engine.module, latest)
            engine.load(str(latest / "engine"), "engine")
        else:  # a checkpoint in DeepSpeed's own format (written before ZERO_STATE_FORMAT): only at its DP size
            if cfg.parallel.zero_stage >= 1 and saved.get("dp") != lay.dp:
                raise ConfigError(f"{latest} holds DeepSpeed's own ZeRO-{saved.get('zero_stage')} state for dp={saved.get('dp')}; "
                                  f"resume it with {saved.get('dp')} data-parallel ranks (checkpoints written since resume at any DP size)")
            engine.load(str(latest / "engine"), "engine")
        if self.rank0:
            print(f"resumed from {latest} at step {meta['step']}", flush=True)
        return meta["step"]

    def _named(self) -> list:
        """(canonical name, parameter) of this rank's parameters, each once."""
        from .model.denoiser import canonical_params

        return list(canonical_params(self.engine.module, self.cfg, self.lay.pp_rank, for_save=True, ep_rank=self.lay.ep_rank))

    def _optimized(self) -> list:
        """(canonical name, parameter) of every parameter whose Adam state this rank holds:
        the last pipeline stage's copy of tied embeddings included (it has state of its own,
        under the embedding's name in its stage's file), buffers left out."""
        import torch

        from .model.denoiser import canonical_params

        return [(n, p) for n, p in canonical_params(self.engine.module, self.cfg, self.lay.pp_rank, ep_rank=self.lay.ep_rank)
                if isinstance(p, torch.nn.Parameter)]

    def describe(self) -> str:
        """The start-up line: size, device, precision, attention kernel, layout, data."""
        import torch

        from .model.attention import CoreAttention

        cfg, lay, model = self.cfg, self.lay, self.model
        n_params = sum(p.numel() for p in model.parameters())
        dtype = next(model.parameters()).dtype
        kernels = sorted({m.backend for m in model.modules() if isinstance(m, CoreAttention)}) or ["transformer_engine"]
        return (f"model: {n_params / 1e6:.2f}M parameters on this rank | {lay.device.type} {str(dtype)[6:]} params"
                f"{' + bf16 autocast' if self.bf16 and dtype != torch.bfloat16 else ''} | attention {','.join(kernels)} | "
                f"layout tp={lay.tp} pp={lay.pp} dp={lay.dp}{f' ep={lay.ep}' if cfg.model.num_moe_experts else ''} engine={engine_name(cfg)} zero={cfg.parallel.zero_stage} | "
                f"objective={cfg.diffusion.objective} | train samples {len(self.train_ds)} x {cfg.data.seq_len} tokens")

    # -- batches --------------------------------------------------------------------------
    def micro_batches(self, step: int, x_GL: np.ndarray, positions_G: np.ndarray, eval: bool = False,
                      seg_GL: np.ndarray | None = None) -> list:
        """This DP rank's micro-batches of one global batch (rows [dp_rank * per_rank, ...))."""
        import torch

        lo, mbs, per_rank = self.lay.dp_rank * self.per_rank, self.mbs, self.per_rank
        xs = torch.from_numpy(x_GL[lo: lo + per_rank])
        ps = torch.from_numpy(positions_G[lo: lo + per_rank])
        out = []
        for i in range(0, per_rank, mbs):
            b = self.objective.make_batch(xs[i: i + mbs], ps[i: i + mbs], step=step, global_batch_size=self.G, eval=eval)
            if seg_GL is not None:
                # Packed documents must not see each other: block attention across <|endoftext|>.
                from .data.loader import with_document_mask

                b.attention_mask = with_document_mask(b.attention_mask, seg_GL[lo + i: lo + i + mbs],
                                                      b.tokens_BS.shape[1], causal=self.objective.causal)
            out.append(b)
        return out

    def step_batches(self, step: int) -> list:
        """The micro-batches this rank trains on at ``step`` (only its own rows are read)."""
        cfg, G, ds = self.cfg, self.G, self.train_ds
        idx = self.train_order.indices(step, G)
        lo, per_rank = self.lay.dp_rank * self.per_rank, self.per_rank
        rows = fit_to_batch(ds, idx, np.stack([ds[int(i)] for i in idx[lo: lo + per_rank]]))
        x = np.zeros((G, rows.shape[1]), dtype=np.int64)
        x[lo: lo + per_rank] = rows
        positions = np.arange(step * G, (step + 1) * G, dtype=np.int64)
        seg = None
        if cfg.data.document_masks:
            seg = np.zeros((G, cfg.data.seq_len), np.int32)
            seg[lo: lo + per_rank] = np.stack([ds.segment_ids(int(i)) for i in idx[lo: lo + per_rank]])
        return self.micro_batches(step, x, positions, seg_GL=seg)

    # -- reductions of logged values (host, once per logged step) -------------------------
    def moe_metrics(self, num_microbatches: int) -> dict:
        """MoE routing of the step just trained (empty for a dense model): ``moe_aux_loss``, the
        load-balancing loss without its coefficient averaged over MoE layers and micro-batches
        (as megatron-core defines it: 1 = uniform routing), and ``moe_max_load``, the heaviest
        expert's share of tokens relative to an even split, worst layer (1 = balanced). Summed
        over data-parallel ranks: every layout reports the same numbers. No token is dropped
        (no expert capacity is set)."""
        import torch

        from .model import moe
        from .parallel import comm

        if self.router_load is None:
            return {}
        counts = self.router_load.take()
        aux = moe.aux_loss_sums()
        n_moe, steps, self.moe_steps = len(self.router_load.routers), max(self.moe_steps, 1), 0
        if counts is None:  # no training forward since the last row
            return {}
        counts = comm.all_reduce_host(counts.cpu(), "sum", self.dp_group)
        aux_sum, n_total = float(aux) if aux is not None else 0.0, float(n_moe)
        if self.cfg.parallel.sequence_parallel and self.lay.tp > 1:
            # each TP rank routed its slice of the sequence: its counts and its share of the
            # aux loss (megatron's P_i over local tokens, f_i global) add up over the TP group
            from megatron.core import parallel_state as ps

            tp_group = ps.get_tensor_model_parallel_group()
            counts = comm.all_reduce_host(counts, "sum", tp_group)
            aux_sum = comm.sum_host(aux_sum, tp_group)
        worst = moe.max_load(counts)
        if self.lay.pp > 1:  # each stage routes its own layers: worst over stages, mean over all layers
            worst = comm.max_host(worst, self.pp_group)
            aux_sum, n_total = (float(v) for v in comm.all_reduce_host([aux_sum, n_total], "sum", self.pp_group))
        out = {"moe_max_load": worst}
        if aux is not None:
            out["moe_aux_loss"] = self.dp_mean(aux_sum / (n_total * num_microbatches * steps))
        return out

    def pp_share(self, x: float) -> float:
        """Losses exist on the last pipeline stage only; give every stage its value."""
        from .parallel import comm

        return x if self.lay.pp == 1 else comm.sum_host(x if self.lay.is_last_stage else 0.0, self.pp_group)

    def dp_mean(self, x: float) -> float:
        from .parallel import comm

        return comm.sum_host(x, self.dp_group) / self.lay.dp

    # -- the four things a run does -------------------------------------------------------
    def train_step(self, step: int, mbl: list | None = None) -> tuple[list, float, bool, float, int, float]:
        """One optimizer step on ``mbl`` (default: this step's batches, read now): (losses,
        grad_norm, bad, lr, tokens and model FLOPs this step over all DP ranks)."""
        mbl = self.step_batches(step) if mbl is None else mbl
        lr = self.engine.set_lr(step)
        self.moe_steps += 1
        losses, grad_norm, bad = self.engine.train_step(mbl, self.loss_fn, seq_len=mbl[0].tokens_BS.shape[1],
                                                        micro_batch_size=self.mbs,
                                                        poison=self.poison_at(step))
        tokens = sum(b.num_tokens for b in mbl) * self.lay.dp
        return losses, grad_norm, bad, lr, tokens, tokens * self.flops_per_token(mbl[0])

    def poison_at(self, step: int) -> str | None:
        """Test hook: the non-finite value injected at ``step`` (engine/poison.py), if any."""
        return next((kind for kind, steps in self.inject.items() if step in steps), None)

    def flops_per_token(self, b) -> float:
        """Model FLOPs per token at this batch's length: variable-length SFT batches are
        shorter than data.seq_len, and attention's share of the FLOPs scales with length."""
        if not self.cfg.data.sft_path:
            return self.fpt
        width = b.labels_BS.shape[1]
        if width not in self._fpt_at:
            self._fpt_at[width] = flops_per_token(self.cfg, self.vocab, width, on_gpu=self.lay.device.type == "cuda")
        return self._fpt_at[width]

    def validate(self, step: int) -> dict | None:
        """Validation loss (and per-noise-level buckets) on fixed samples with fixed noise."""
        import torch

        if self.val_ds is None:
            return None
        G, engine, loss_fn = self.G, self.engine, self.loss_fn
        engine.eval()
        total, count = 0.0, 0
        loss_fn.collect = []  # per-sequence losses and t, for the per-noise-level buckets
        with torch.no_grad():  # val_order is seeded 0: every run evaluates the same samples with the same noise
            for k in range(self.cfg.train.eval_batches):
                idx = self.val_order.indices(k, G)
                x = fit_to_batch(self.val_ds, idx, np.stack([self.val_ds[int(i)] for i in idx]))
                pos = np.arange(k * G, (k + 1) * G, dtype=np.int64)
                # validation sees documents as training does: no attention across them
                seg = np.stack([self.val_ds.segment_ids(int(i)) for i in idx]) if self.cfg.data.document_masks else None
                mbl = self.micro_batches(k, x, pos, eval=True, seg_GL=seg)
                vals = engine.forward_only(mbl, loss_fn, seq_len=mbl[0].tokens_BS.shape[1], micro_batch_size=self.mbs)
                for b, v in zip(mbl, vals):
                    total += float(v) * b.num_tokens
                    count += b.num_tokens
        engine.train()
        collected, loss_fn.collect = loss_fn.collect, None
        loss = self.dp_mean(self.pp_share(total / max(count, 1)))
        row = {"step": step, "split": "val", "loss": loss, "ppl_bound": math.exp(min(loss, 50.0))}
        if not self.objective.causal:
            row.update(bucket_losses(collected, self.pp_group if self.lay.pp > 1 else None, self.dp_group))
        return row

    def save(self, step: int) -> None:
        """Checkpoint ``step`` without stalling training (saving.py): await the previous save,
        copy what this rank writes to host memory, and hand it to the background writer;
        rank 0 commits it once every rank's files are written."""
        from . import checkpoint as ckpt
        from .parallel import dist as pdist

        cfg, lay = self.cfg, self.lay
        self.saver.wait()
        self.engine.sync_params()  # the megatron engine may still owe a parameter all-gather
        tmp = ckpt.begin_save(self.out, step)
        if self.rank0:
            ckpt.prepare_tmp(tmp)
        pdist.barrier()
        staging = self.saver.staging
        staging.begin()
        files = self._stage_model(staging) + self.engine.stage_state(self._optimized(), staging, tp_rank=lay.tp_rank,
                                                                     pp_rank=lay.pp_rank, dp_rank=lay.dp_rank)
        meta = None
        if self.rank0:
            meta = {"config": to_dict(cfg), "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep,
                                                       "zero_stage": cfg.parallel.zero_stage},
                    "tokenizer_sha256": self.tok.sha256, "vocab_size": self.vocab, "consumed_samples": step * self.G,
                    "engine": engine_name(cfg), "optimizer": getattr(self.engine, "state_format", None)}
        self.saver.start(step, tmp, files, meta)

    def _stage_model(self, staging) -> list:
        """This (TP, PP) rank's weights (fp32) copied into ``staging``, on DP rank 0 (ZeRO-3
        gathers them first: a collective over the DP group); with expert parallelism, DP rank
        0 also writes expert-parallel rank 0's experts and every other expert-parallel rank's
        first expert-data-parallel rank writes its own experts to a file of their own."""
        import torch

        from . import checkpoint as ckpt
        from .saving import StagedFile

        cfg, lay, named = self.cfg, self.lay, self._named()

        def staged() -> list:
            if lay.dp_rank == 0:
                mine, ep = named, 0
            elif lay.ep_rank > 0 and lay.expert_dp_rank == 0:
                from .model.sharding import is_expert

                mine, ep = [(n, p) for n, p in named if is_expert(n)], lay.ep_rank
            else:
                return []
            return [StagedFile(f"model/{ckpt.shard_filename(lay.tp_rank, lay.pp_rank, ep)}",
                               {n: staging.copy(f"model/{n}", p, torch.float32) for n, p in mine})]

        if cfg.parallel.zero_stage == 3 and engine_name(cfg) == "deepspeed":
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return staged()
        return staged()

    def fit(self) -> dict:
        """The training loop, then ``finish``; returns a summary dict (on every rank)."""
        from .data.prefetch import Prefetcher

        cfg = self.cfg
        # the next steps' batches are read and noised while this one runs
        batches = Prefetcher(self.step_batches, self.start_step, cfg.train.steps, cfg.data.prefetch)
        try:
            last = self._loop(batches)
        except TrainingDiverged:
            # every rank stops at the same step (the engines agree on the flag): keep the
            # last good checkpoint, which may still be being written
            self.saver.wait()
            raise
        finally:
            batches.close()
        return self.finish(last)

    def _loop(self, batches) -> dict:
        """Steps start_step .. train.steps with their batches from ``batches``; returns the
        last logged row."""
        import torch

        from .parallel import comm

        cfg, lay, logger = self.cfg, self.lay, self.logger
        bad_in_a_row, last = 0, {}
        self.engine.train()
        t_last, tokens_since, flops_since = time.time(), 0, 0.0
        for step in range(self.start_step, cfg.train.steps):
            losses, grad_norm, bad, lr, tokens, flops = self.train_step(step, batches.get(step))
            tokens_since += tokens
            flops_since += flops
            if bad:
                bad_in_a_row += 1
                if self.rank0:
                    print(f"warning: non-finite loss or gradient at step {step}; update skipped ({bad_in_a_row}/{cfg.train.max_bad_steps} in a row)", flush=True)
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    logger.close()
                    raise TrainingDiverged(f"stopping: {bad_in_a_row} non-finite steps (loss or gradient) in a row (last good checkpoint "
                                           f"kept in {self.out / 'checkpoints'}); lower train.lr or check the data")
                continue
            bad_in_a_row = 0
            done = step + 1
            if done % cfg.logging.log_interval == 0 or done == cfg.train.steps:
                loss_v = self.dp_mean(self.pp_share(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in losses]).mean().item()))
                dt = max(time.time() - t_last, 1e-9)
                tps = tokens_since / dt
                row = {"step": done, "loss": loss_v, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tps,
                       **({"mfu": flops_since / dt / (self.peak * lay.world_size)} if self.peak else {}), **memory_gib(lay.device),
                       **self.moe_metrics(len(losses))}
                logger.log(row)
                last = row
                t_last, tokens_since, flops_since = time.time(), 0, 0.0
            if cfg.train.eval_interval and done % cfg.train.eval_interval == 0 and done != cfg.train.steps:
                r = self.validate(done)
                if r:
                    logger.log(r)
            preempted = self.stop.signum is not None or done == self.stop_at
            # One tiny all-reduce per step: one rank's signal stops all of them at the same
            # step, and a background save is committed once no rank is still writing it.
            stop, busy, failed = comm.all_reduce_host([1.0 if preempted else 0.0, self.saver.busy(), self.saver.failed()], "max").tolist()
            self.saver.poll(busy, failed)
            if stop > 0:
                self.save(done)
                self.saver.wait()
                if self.rank0:
                    print(f"received stop signal: checkpoint saved at step {done}, exiting for requeue", flush=True)
                logger.close()
                raise Preempted(done)
            if cfg.train.save_interval and done % cfg.train.save_interval == 0 and done != cfg.train.steps:
                self.save(done)
        return last

    def finish(self, last: dict) -> dict:
        """Final checkpoint, validation and (single-rank layouts) a generated sample."""
        cfg, lay = self.cfg, self.lay
        if self.start_step < cfg.train.steps and cfg.train.save_at_end:
            self.save(cfg.train.steps)
        self.saver.wait()
        val = self.validate(cfg.train.steps)
        if val:
            self.logger.log(val)
        summary = {"final": last, "val": val, "output_dir": str(self.out)}
        if cfg.train.sample_at_end and lay.tp == 1 and lay.pp == 1:
            self.engine.sync_params()  # a collective: every rank, before rank 0 samples
        if cfg.train.sample_at_end and self.rank0 and lay.tp == 1 and lay.pp == 1:
            from .generate import sample_text

            text = sample_text(self.engine.module, self.tok, cfg, device=lay.device)
            print("---- sample ----\n" + text + "\n----------------", flush=True)
            summary["sample"] = text
        self.logger.close()
        return summary


def fit_to_batch(ds, indices_G: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows of the global batch ``indices_G`` at the batch's one length: SFT datasets with
    variable length (data.sft_padding=batch) cut them to ``ds.batch_length`` of the whole
    global batch, so every rank, reading only its own rows, agrees; other data unchanged."""
    if getattr(ds, "pad_to_batch", None) is None:
        return rows
    from .data.sft import cut_to_length

    return cut_to_length(rows, ds.batch_length(indices_G))


def run(cfg: Config) -> dict:
    """Train according to ``cfg``; returns a summary dict (on every rank)."""
    quiet_warnings()
    return Trainer(cfg).fit()


NUM_T_BUCKETS = 10


def bucket_losses(collected: list, pp_group, dp_group, num_buckets: int = NUM_T_BUCKETS) -> dict:
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


class Preempted(Exception):
    """Raised after the stop-signal checkpoint; entry points exit with EXIT_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(f"preempted after step {step}")
        self.step = step


def loss_index(weight_BS):
    """Flat indices s * B + b of the positions whose loss weight is not 0 (the model runs its
    output layer on those rows only). Computed on the host from the CPU batch: no device sync.
    Never empty: a batch without loss keeps one row (its weight is 0 anyway).  -> [N] int64"""
    import torch

    idx = torch.nonzero(weight_BS.t().reshape(-1) != 0).reshape(-1)
    return idx if idx.numel() else torch.zeros(1, dtype=torch.long)


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
        # model_kwargs (continuous diffusion's sigma and noise seeds) stay on the host: the
        # model draws the noise and the time features there and copies them to the device;
        # moving them first would cost a device-to-host read back per micro-batch.
        extra = dict(getattr(b, "model_kwargs", None) or {})
        if labels is not None:
            extra["loss_index"] = self._dev(loss_index(b.loss_weight_BS))
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
    DDP + distributed optimizer for PP>1 (and the other cases config.resolved_engine names),
    DeepSpeed otherwise."""
    from .config import resolved_engine

    return resolved_engine(cfg.parallel, cfg.model)


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
    if engine_name(cfg) == "megatron":  # layouts were checked by config.validate_layout
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
