"""DeepSpeed engine around the megatron-core denoiser (data parallel, ZeRO 0-3).

The trainer talks to a tiny interface — ``train_step(micro_batches)``, ``stage_state``
(checkpoint), ``load_state`` — so that the megatron-core optimizer engine used for pipeline
layouts can stand behind the same calls.

DeepSpeed owns gradient accumulation (global / (micro * dp) micro-steps), the all-reduce or
reduce-scatter over data-parallel ranks, gradient clipping and the ZeRO partitioning of
optimizer states (1), gradients (2) and parameters (3). The optimizer is torch AdamW with
no weight decay on norms; the LR comes from our pure schedule function each step.
"""
from __future__ import annotations

import math
import os

import torch

from . import ZERO_STATE_FORMAT
from .schedules import lr_for


def ds_config(cfg, *, dp: int, bf16: bool) -> dict:
    """DeepSpeed config for this run. Precision (bf16) per ZeRO stage:

    - ZeRO-0: DeepSpeed's ``torch_autocast`` — fp32 parameters and gradients, bf16 matmuls.
      (DeepSpeed 0.19 refuses bf16 parameters with fp32 gradient accumulation at stage 0,
      and bf16 accumulation over many micro-batches loses low-order bits.) No module is
      listed as "lower-precision safe", so gradients are all-reduced in fp32 too.
    - ZeRO-1: bf16 parameters + ``grad_accum_dtype=fp32`` selects DeepSpeed's BF16_Optimizer:
      fp32 master weights (partitioned over DP), fp32 gradient accumulation into one full-size
      buffer (each bf16 gradient is added and freed as backward produces it).
    - ZeRO-2/3: bf16 parameters, fp32 gradient accumulation buffers, fp32 master partitions.
    In every bf16 mode gradients are reduced in fp32 (``communication_data_type``).

    Overlap of the DP gradient reduction with backward (what runs, measured in
    tests/distributed/check_bf16.py): ZeRO-2/3 reduce every micro-batch in buckets of
    ``reduce_bucket_size`` (5e8 elements) launched from gradient hooks on a side stream
    (``overlap_comm``); only the last bucket waits for the end of backward. ZeRO-1 overlaps
    in fp32 only: in bf16 its BF16_Optimizer, which takes no ``overlap_comm``, all-reduces
    the whole fp32 accumulator once per step after the last micro-batch's backward, exposed
    (as ZeRO-0 does its gradients).
    """
    t = cfg.train
    stage = cfg.parallel.zero_stage
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    conf = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.global_batch_size,
        # ZeRO-0: we clip ourselves with a TP-aware norm (DeepSpeed's fp32 path clipped with a
        # wrong norm under tensor parallelism, breaking TP=2 == TP=1); ZeRO 1-3 clip inside
        # DeepSpeed's partitioned optimizer.
        "gradient_clipping": t.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        # immediate_grad_update: BF16_Optimizer (ZeRO-1) adds each bf16 gradient into its fp32
        # accumulator as soon as backward produces it and frees it, instead of keeping a
        # second, bf16 copy of every gradient alive (2 bytes per parameter).
        "bf16": {"enabled": bf16 and stage > 0, "immediate_grad_update": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if bf16 and stage == 0:
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if bf16 and stage > 0:
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
        conf["communication_data_type"] = "fp32"
    if stage in (1, 2):
        # overlap_comm: the DP reduction of a bucket runs while backward continues (ZeRO-2, and
        # ZeRO-1 in fp32; bf16 ZeRO-1's BF16_Optimizer ignores it, see the docstring).
        conf["zero_optimization"].update({"reduce_scatter": True, "overlap_comm": True, "contiguous_gradients": True})
    if stage == 3:
        conf["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "overlap_comm": True})
    return conf


def params_dtype(cfg, bf16: bool):
    """dtype the model is built in for this engine: bf16 where DeepSpeed keeps bf16 parameters
    (ZeRO >= 1), fp32 under ZeRO-0's autocast and for fp32 runs."""
    return torch.bfloat16 if bf16 and cfg.parallel.zero_stage > 0 else torch.float32


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DeepSpeedEngine:
    def __init__(self, model: torch.nn.Module, cfg, *, dp: int, bf16: bool, mpu):
        import deepspeed

        self.cfg = cfg
        self.bf16 = bf16
        t = cfg.train
        opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=ds_config(cfg, dp=dp, bf16=bf16), mpu=mpu, dist_init_required=False
        )
        self.gas = self.engine.gradient_accumulation_steps()
        self.module = self.engine.module

    def set_lr(self, step: int) -> float:
        t = self.cfg.train
        lr = lr_for(t, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self, micro_batches: list, loss_fn, *, poison=None, **_):
        """Forward/backward over this rank's micro-batches and the optimizer step.

        Returns (per-micro-batch losses, grad_norm, bad). A step is bad when any rank saw a
        non-finite loss or the gradients are non-finite; it is then skipped on every rank:

        - non-finite loss: that micro-batch backpropagates from an exact zero instead (so
          DeepSpeed's hooks and collectives still line up; where the loss's own graph holds
          the NaN, 0 x NaN still makes its gradients NaN, which the skip discards); the flag
          stays on the device and the ranks agree on it once per step. Skipping = zero
          gradients and LR 0: weights unchanged. Adam's moments decay by one step where the
          gradients were finite (ZeRO-1/2); with NaN gradients DeepSpeed's own overflow
          check skips that step instead, moments untouched. ZeRO-3 cannot build that zero
          from its partitioned parameters, so it stops instead (TrainingDiverged).
        - non-finite gradient with finite losses: ZeRO-0 (our clipping) folds the grad norm
          into the same flag, read with the norm in the step's one host sync; ZeRO 1-3 clip
          inside DeepSpeed, whose optimizer skips the update when the global norm is not
          finite and reports it as inf.

        ``poison`` (test hook, engine/poison.py): "loss", a NaN loss on every micro-batch;
        "loss_last_rank", a NaN loss value on the last data-parallel rank only; "grad", a NaN
        gradient from the first micro-batch of data-parallel rank 0."""
        from megatron.core import parallel_state as ps

        from ..parallel import comm
        from . import poison as pz

        pz.check(poison)
        stage = self.cfg.parallel.zero_stage
        losses, bad_dev = [], None
        if self.cfg.model.num_moe_experts:
            from ..model.moe import set_aux_loss_scale

            # DeepSpeed divides each micro-batch's loss by gas; the routers' aux loss joins the
            # gradient on its own (megatron-core's autoscaler) and needs the same 1/gas.
            set_aux_loss_scale(1.0 / len(micro_batches), next(self.module.parameters()).device)
        for i, b in enumerate(micro_batches):
            out = loss_fn.forward(self.engine, b)
            loss, _ = loss_fn.reduce(b, out)
            if pz.poisons_loss(poison):
                loss = pz.poisoned_loss(poison, loss)
            bad_mb = ~torch.isfinite(loss)
            bad_dev = bad_mb if bad_dev is None else bad_dev | bad_mb
            # 0 * loss would still be nan; a zero built from the parameters is exact and
            # keeps every parameter in the graph (DeepSpeed's hooks expect all of them).
            loss_bwd = torch.where(bad_mb, self._zero_from_params(), loss) if stage != 3 else loss
            if poison == "grad" and i == 0 and ps.get_data_parallel_rank() == 0:
                loss_bwd = pz.poison_grad(loss_bwd, out)
            self.engine.backward(loss_bwd)  # DeepSpeed scales by 1/gas internally
            losses.append(loss.detach())
            if i < len(micro_batches) - 1:
                self.engine.step()  # not a boundary: only advances the accumulation counter
        if stage == 0:
            # Gradients are all-reduced by now: the norm, and whether it is finite, is the
            # same on every rank; the flag still goes through the world so all ranks agree.
            norm = self._grad_norm_replicated_grads()
            flag = comm.any_flag(bad_dev | ~torch.isfinite(norm))
            flag_h, norm_h = torch.stack([flag.reshape(()).to(norm.dtype), norm]).tolist()  # the step's one host read
            if flag_h > 0:
                return self._skip(losses)
            return losses, self._step_zero0(norm, norm_h), False
        if comm.any_flag(bad_dev).item() > 0:  # the step's one host sync for the flag
            if stage == 3:
                from . import TrainingDiverged

                raise TrainingDiverged("non-finite loss under parallel.zero_stage=3, which cannot skip an update: stopping "
                                       "before it is applied (the last checkpoint is untouched); lower train.lr or check the data")
            return self._skip(losses)
        self.engine.step()
        g = self.engine.get_global_grad_norm()
        gn = float(g) if g is not None else float("nan")
        if not math.isfinite(gn):  # DeepSpeed's optimizer found a non-finite norm and skipped the update
            return losses, float("nan"), True
        return losses, gn, False

    def _skip(self, losses):
        """Leave the weights unchanged this step: zero gradients, LR 0, and a step (so
        DeepSpeed's counters advance as on every rank)."""
        self.engine.zero_grad()
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self.engine.step()
        return losses, float("nan"), True

    def _zero_from_params(self) -> torch.Tensor:
        return sum(p.sum() for p in self.module.parameters() if p.requires_grad).float() * 0.0

    def sync_params(self) -> None:
        """Weights are complete after every step here (ZeRO-3 gathers on access)."""

    def forward_only(self, micro_batches: list, loss_fn, **_) -> list:
        return [loss_fn.reduce(b, loss_fn.forward(self.engine, b))[0].detach() for b in micro_batches]

    def _grad_norm_replicated_grads(self) -> torch.Tensor:
        """Global grad norm when gradients live on the module (ZeRO-0, after DP all-reduce),
        as a 0-d fp32 tensor on the gradients' device.

        TP-split gradients are summed over the TP group; replicated ones (norms) are
        identical on every TP rank and counted once."""
        from megatron.core import parallel_state as ps

        from ..parallel import comm

        split, repl = [], []
        for p in self.module.parameters():
            if p.grad is not None:
                (split if getattr(p, "tensor_model_parallel", False) else repl).append(p.grad.detach())
        dev = (split or repl)[0].device

        def sq(gs):  # sum of squares in fp32 (foreach norms: one kernel per dtype group)
            if not gs:
                return torch.zeros((), dtype=torch.float32, device=dev)
            return torch.stack([n.float() for n in torch._foreach_norm(gs)]).pow(2).sum()

        split_sq, repl_sq = sq(split), sq(repl)
        if ps.get_tensor_model_parallel_world_size() > 1:
            comm.all_reduce_any_device_(split_sq, "sum", ps.get_tensor_model_parallel_group())
        return (split_sq + repl_sq).sqrt()

    def _step_zero0(self, norm: torch.Tensor, norm_h: float) -> float:
        """ZeRO-0 optimizer step with our TP-aware clipping on the device: coefficient
        min(1, clip / (norm + 1e-6)), no host branch (``norm`` is finite here)."""
        clip = self.cfg.train.grad_clip
        if clip > 0:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef)
        self.engine.step()
        return norm_h

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    # -- checkpoints: the project's own optimizer-state format (zero_state.py) -------------
    state_format = ZERO_STATE_FORMAT

    def stage_state(self, named: list, staging, *, tp_rank: int, pp_rank: int, dp_rank: int) -> list:
        """This rank's fragment of the optimizer state, copied into ``staging`` (host), as the
        file ``optim/tp{T}_pp{P}_dp{D}.safetensors``; at ZeRO-0 only DP rank 0 writes one
        (every DP rank holds the same state)."""
        from ..saving import StagedFile
        from . import zero_state

        stage = self.cfg.parallel.zero_stage
        if stage == 0 and dp_rank != 0:
            return []
        opt = self.optimizer
        # bf16 parameters (ZeRO >= 1): the fp32 masters are saved too; fp32 parameters are their own master
        with_master = stage > 0 and self.bf16
        tensors = zero_state.stage_fragments(opt, stage, named, staging, with_master=with_master)
        meta = {"format": ZERO_STATE_FORMAT, "adam_step": str(zero_state.adam_step(opt, stage))}
        return [StagedFile(f"optim/tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.safetensors", tensors, meta)]

    def load_state(self, directory, named: list, *, tp_rank: int, pp_rank: int, step: int) -> int:
        """Optimizer state from ``stage_state`` files written at any DP size (the weights are
        already in the module); returns (bytes this rank read, bytes of this (TP, PP) rank's
        state over all DP ranks)."""
        from pathlib import Path

        from . import zero_state

        stage = self.cfg.parallel.zero_stage
        reader = zero_state.FragmentReader(Path(directory), tp_rank, pp_rank)
        zero_state.load_fragments(self.optimizer, stage, named, reader)
        # DeepSpeed's step counters (our LR comes from the step, but keep them consistent)
        self.engine.global_steps = step
        self.engine.global_samples = step * self.cfg.train.global_batch_size
        return reader.bytes_read, reader.total_bytes

    def load(self, directory: str, tag: str) -> dict:
        """A checkpoint in DeepSpeed's own format (written before ZERO_STATE_FORMAT; loads
        only at the DP size that wrote it)."""
        from ..checkpoint import check_torch_files

        check_torch_files(directory)
        _, client = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {directory}")
        return client

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()
