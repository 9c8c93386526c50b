"""DeepSpeed engine around the megatron-core denoiser (data parallel, ZeRO 0-3).

The trainer talks to a tiny interface — ``forward_backward(micro_batches)``, ``step()``,
``save(dir)``, ``load(dir)`` — so that the megatron-core optimizer engine used for pipeline
layouts can stand behind the same calls.

DeepSpeed owns gradient accumulation (global / (micro * dp) micro-steps), the all-reduce or
reduce-scatter over data-parallel ranks, gradient clipping and the ZeRO partitioning of
optimizer states (1), gradients (2) and parameters (3). The optimizer is torch AdamW with
no weight decay on norms; the LR comes from our pure schedule function each step.
"""
from __future__ import annotations

import os

import torch

from .schedules import lr_for


def ds_config(cfg, *, dp: int, bf16: bool) -> dict:
    t = cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    conf = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.global_batch_size,
        # ZeRO-0: we clip ourselves with a TP-aware norm (DeepSpeed's fp32 path clipped with a
        # wrong norm under tensor parallelism, breaking TP=2 == TP=1); ZeRO 1-3 clip inside
        # DeepSpeed's partitioned optimizer.
        "gradient_clipping": t.grad_clip if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if cfg.parallel.zero_stage in (1, 2):
        # Reduce in fp32 even for bf16 params (numerically matches plain AdamW on CPU).
        conf["zero_optimization"].update({"reduce_scatter": True, "overlap_comm": False, "contiguous_gradients": True})
    if cfg.parallel.zero_stage == 3:
        conf["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "overlap_comm": False})
    return conf


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

    def train_step(self, micro_batches: list, loss_fn, *, poison: bool = False, **_):
        """Forward/backward over this rank's micro-batches and the optimizer step.

        Returns (per-micro-batch losses, grad_norm, bad). If any rank sees a non-finite
        loss, every rank backpropagates an exact zero instead (so DeepSpeed's hooks and
        collectives still line up) and the update is skipped: zero gradients and LR 0
        leave the weights unchanged (Adam's moments decay by one step)."""
        import torch.distributed as dist

        losses, bad = [], False
        for i, b in enumerate(micro_batches):
            loss, _ = loss_fn.reduce(b, loss_fn.forward(self.engine, b))
            if poison:
                loss = loss * float("nan")
            flag = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
            dist.all_reduce(flag)
            if flag.item() > 0:
                bad = True
                if self.cfg.parallel.zero_stage == 3:
                    raise FloatingPointError("non-finite loss under ZeRO-3, which cannot skip a step")
                # 0 * loss would still be nan; a zero built from the parameters is exact.
                loss_bwd = sum(p.sum() for p in self.module.parameters() if p.requires_grad) * 0.0
            else:
                loss_bwd = loss
            self.engine.backward(loss_bwd)  # DeepSpeed scales by 1/gas internally
            losses.append(loss.detach())
            if i < len(micro_batches) - 1:
                self.engine.step()  # not a boundary: only advances the accumulation counter
        if bad:
            self.engine.zero_grad()
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
            self.engine.step()
            return losses, float("nan"), True
        return losses, self.step(), False

    def forward_only(self, micro_batches: list, loss_fn, **_) -> list:
        return [loss_fn.reduce(b, loss_fn.forward(self.engine, b))[0].detach() for b in micro_batches]

    def _grad_norm_replicated_grads(self) -> float:
        """Global grad norm when gradients live on the module (ZeRO-0, after DP all-reduce).

        TP-split gradients are summed over the TP group; replicated ones (norms) are
        identical on every TP rank and counted once."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        split = torch.zeros((), dtype=torch.float64)
        repl = torch.zeros((), dtype=torch.float64)
        for p in self.module.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum().cpu()
            if getattr(p, "tensor_model_parallel", False):
                split += sq
            else:
                repl += sq
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(split, group=ps.get_tensor_model_parallel_group())
        return float((split + repl).sqrt())

    def step(self) -> float:
        """Optimizer step at the accumulation boundary; returns the global grad norm
        (before clipping)."""
        gn = None
        if self.cfg.parallel.zero_stage == 0:
            gn = self._grad_norm_replicated_grads()
            clip = self.cfg.train.grad_clip
            if clip > 0 and gn > clip:
                coef = clip / (gn + 1e-6)
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        self.engine.step()
        if gn is None:
            g = self.engine.get_global_grad_norm()
            gn = float(g) if g is not None else float("nan")
        return gn

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        _, client = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {directory}")
        return client

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()
