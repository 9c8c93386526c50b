"""megatron-core engine for pipeline-parallel layouts: DDP + distributed optimizer + schedules.

DeepSpeed's ZeRO does not compose with megatron-core's pipeline schedules (DESIGN.md §5:
ZeRO-2 crashed with two in-flight microbatches and the default mode silently kept only the
last microbatch's gradients), so layouts with ``parallel.pp > 1`` run on megatron-core's
own stack: ``DistributedDataParallel`` (gradient buffers, DP reduce-scatter),
``DistributedOptimizer`` (Adam states partitioned over DP ranks, i.e. ZeRO-1) and the 1F1B
schedule from ``get_forward_backward_func``.

The trainer sees the same small interface as the DeepSpeed engine. Micro-batches of one
optimizer step are the *same* Batch objects on every stage (built deterministically from
(seed, step, sample)), so the first stage's noised inputs and the last stage's targets,
loss weights and 1/t always belong to one draw of noise.
"""
from __future__ import annotations

from functools import partial

import torch

from .schedules import lr_for


class MegatronEngine:
    def __init__(self, model: torch.nn.Module, cfg, *, dp: int, bf16: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

        self.cfg = cfg
        self.device = next(model.parameters()).device
        t = cfg.train
        tcfg = model.config
        if bf16 and tcfg.params_dtype != torch.bfloat16:
            raise ValueError("MegatronEngine(bf16=True) needs a model built with bf16 parameters "
                             "(build_model(..., params_dtype=torch.bfloat16)); fp32 main params live in the optimizer")
        # zero_stage 1: Adam states sharded over DP (megatron's distributed optimizer);
        # zero_stage 0: every DP rank keeps full optimizer states.
        distributed = cfg.parallel.zero_stage == 1
        # overlap_param_gather: after the distributed optimizer's step each rank holds only
        # its own updated shard; megatron's forward pre-hooks gather the rest bucket by
        # bucket during the next forward (each waits for its bucket and starts the next),
        # hiding the all-gather behind compute. Reads without a forward on every rank call sync_params() first.
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=distributed,
            overlap_param_gather=distributed, average_in_collective=False,
        )
        self.ddp = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=model)
        # The schedule calls these hooks: DP gradient reduction (and tied-embedding sync
        # across stages) once all micro-batches are through.
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.no_sync_func = self.ddp.no_sync
        ocfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=distributed,
        )
        from ..parallel.cpu_compat import cuda_type_names

        with cuda_type_names():
            # Without the standard overrides megatron-core decays norm weights too; these
            # skip 1-D and bias parameters, matching the DeepSpeed path's param groups.
            self.optimizer = get_megatron_optimizer(ocfg, [self.ddp], config_overrides=get_standard_config_overrides(ocfg))
        self.module = model
        self.engine = self.ddp
        self.gas = t.global_batch_size // (t.micro_batch_size * dp)
        self._lr = t.lr

    # -- interface shared with DeepSpeedEngine ------------------------------------------
    def set_lr(self, step: int) -> float:
        t = self.cfg.train
        lr = lr_for(t, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            # megatron-core's groups carry wd_mult (0 for norms/biases), which only its own
            # scheduler applies; we drive LR ourselves, so apply it here too.
            g["weight_decay"] = t.weight_decay * g.get("wd_mult", 1.0)
        self._lr = lr
        return lr

    def train_step(self, micro_batches: list, loss_fn, *, seq_len: int, micro_batch_size: int, poison=None):
        """Forward/backward of all micro-batches through the pipeline schedule, then the
        optimizer step. Returns (losses — real on the last stage, zeros elsewhere —,
        grad_norm, bad). A non-finite loss on any rank, or a non-finite gradient anywhere,
        skips the optimizer step on all ranks (the gradient buffers are zeroed before the
        next step). megatron-core's optimizer checks for inf/NaN only when it scales the
        loss (fp16): in fp32 and bf16 a NaN norm would make its clip test false and apply
        the NaN, so the check is ours. ``poison`` ("loss", "loss_last_rank" or "grad"): test
        hook, see engine/poison.py."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from . import poison as pz

        pz.check(poison)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        poison_grad_left = [poison == "grad" and ps.get_data_parallel_rank() == 0]

        def reduce(b, out):
            loss, rep = loss_fn.reduce(b, out)
            if pz.poisons_loss(poison):
                loss = pz.poisoned_loss(poison, loss)
                rep = {"loss": loss.detach()}
            elif poison_grad_left[0]:  # first micro-batch only: the value stays finite
                poison_grad_left[0] = False
                loss = pz.poison_grad(loss, out)
            return loss, rep

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = loss_fn.forward(model, b)
            return out, partial(reduce, b)

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.ddp],
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        vals = [d["loss"] for d in losses] if losses else [torch.zeros((), device=self.device) for _ in micro_batches]
        from ..parallel import comm

        # Non-finite on any rank (losses live on the last stage, gradients in this rank's
        # DDP buffers, reduced over DP by now): one all-reduce of a device flag and one host
        # read per step.
        bad_dev = ~torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in vals])).all()
        for buf in self.ddp.buffers + self.ddp.expert_parallel_buffers:
            bad_dev = bad_dev | ~torch.isfinite(buf.grad_data).all()
        if comm.any_flag(bad_dev).item() > 0:
            return vals, float("nan"), True
        from ..parallel.cpu_compat import cuda_type_names

        with cuda_type_names():  # clip_grads asserts CUDA type names too
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:  # megatron-core skipped the update itself (fp16 loss-scale overflow)
            return vals, float("nan"), True
        return vals, float(grad_norm) if grad_norm is not None else float("nan"), False

    def sync_params(self) -> None:
        """Complete the parameter all-gather that overlap_param_gather defers to the next
        forward. A forward (training, validation) waits for it in megatron's pre-hooks; a
        read of the weights without a forward (saves) would see this rank's updated shard
        next to the other ranks' stale ones, and a forward on one rank only (rank 0's
        sample) would start the gather alone and hang. A collective over DP: every rank."""
        if self.ddp.use_forward_hook:
            self.ddp.start_param_sync(force_sync=True)

    def forward_only(self, micro_batches: list, loss_fn, *, seq_len: int, micro_batch_size: int) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            return loss_fn.forward(model, b), partial(loss_fn.reduce, b)

        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.ddp],
            num_microbatches=len(micro_batches), seq_length=seq_len, micro_batch_size=micro_batch_size, forward_only=True,
        )
        return [d["loss"] for d in out] if out else [torch.zeros((), device=self.device) for _ in micro_batches]

    def _names(self) -> tuple[str, str]:
        from megatron.core import parallel_state as ps

        tag = f"tp{ps.get_tensor_model_parallel_rank()}_pp{ps.get_pipeline_model_parallel_rank()}"
        ep_rank = ps.get_expert_model_parallel_rank()
        tag += f"_ep{ep_rank}" if ep_rank else ""  # MoE: each expert-parallel rank has its own experts' states
        return f"optim_{tag}.pt", f"common_{tag}.pt"

    state_format = None  # megatron-core's own (DP-gathered) optimizer state under engine/

    def stage_state(self, named: list, staging, *, tp_rank: int, pp_rank: int, dp_rank: int) -> list:
        """This (TP, PP) rank's optimizer state as host objects for the background writer,
        on DP rank 0: the distributed optimizer's state gathered over the DP group (a
        collective, run here in step with the other ranks; megatron-core gathers into host
        buffers of its own) as ``engine/optim_tp{T}_pp{P}.pt``, and the common state as
        ``engine/common_tp{T}_pp{P}.pt``. A checkpoint written at one DP size loads at any
        other: the distributed optimizer re-shards on load."""
        from megatron.core import parallel_state as ps

        from ..saving import StagedFile, host_tree

        optim_name, common_name = self._names()
        files = []
        if self.cfg.parallel.zero_stage == 1:
            # what save_parameter_state writes, gathered into CPU buffers of megatron's own:
            # one state, or for a ChainedOptimizer (MoE: dense + expert parameters) a list
            # with None where this rank is not rank 0 of that optimizer's DP group
            opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
            states, mine = [], False
            for o in opts:
                if hasattr(o, "get_parameter_state_dp_zero"):
                    st = o.get_parameter_state_dp_zero()  # a collective over o's DP group
                    first = o.data_parallel_group.rank() == 0
                    states.append(st if first else None)
                    mine = mine or first
            if mine:
                files.append(StagedFile(f"engine/{optim_name}", obj=states[0] if len(opts) == 1 else states))
        # expert-data-parallel rank 0 of every expert-parallel rank (without MoE: DP rank 0)
        if ps.get_data_parallel_rank() == 0 or (ps.get_expert_model_parallel_rank() > 0 and ps.get_expert_data_parallel_rank() == 0):
            files.append(StagedFile(f"engine/{common_name}", obj=host_tree(
                {"optimizer": self.optimizer.state_dict(), "client": {}, "adam_step": self._adam_step()})))
        return files

    def _torch_optimizers(self):
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [o.optimizer for o in opts]

    def _adam_step(self) -> float:
        """Adam's bias-correction step count (identical for every parameter)."""
        for opt in self._torch_optimizers():
            for st in opt.state.values():
                if "step" in st:
                    return float(st["step"])
        return 0.0

    def load(self, directory: str, tag: str, model_state: dict | None = None) -> dict:
        """Weights come from the layout-free model shards (``model_state``); then optimizer."""
        import os

        from ..checkpoint import check_torch_files

        optim_name, common_name = self._names()
        path = os.path.join(directory, common_name)
        check_torch_files(directory)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint was written with a different TP/PP layout "
                                    f"(reshard it offline or resume with the original parallel.tp/parallel.pp)")
        common = torch.load(path, map_location="cpu", weights_only=False)
        if model_state is not None:
            self.module.load_state_dict(model_state, strict=False)
        self.optimizer.load_state_dict(common["optimizer"])
        if self.cfg.parallel.zero_stage == 1:
            # megatron-core copies into fp32 main params that are views of leaf parameters
            # (requires_grad); that is only legal without autograd recording.
            # megatron-core's dp_zero loader copies every key of the live optimizer state from
            # the file, but the file has no torch-AdamW 'step': take it out around the load and
            # restore the recorded count (else resume would restart Adam's bias correction).
            for opt in self._torch_optimizers():
                for st in opt.state.values():
                    st.pop("step", None)
            with torch.no_grad():
                self.optimizer.load_parameter_state(os.path.join(directory, optim_name))
            for opt in self._torch_optimizers():
                for st in opt.state.values():
                    st["step"] = torch.tensor(float(common.get("adam_step", 0.0)))
        return common["client"]

    def train(self):
        self.ddp.train()

    def eval(self):
        self.ddp.eval()
