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

from . import ZERO_STATE_FORMAT
from .schedules import lr_for


class MegatronEngine:
    def __init__(self, model: torch.nn.Module, cfg, *, dp: int, bf16: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

        self.cfg = cfg
        self.bf16 = bf16  # bf16 weights: the fp32 main copies are saved too
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

    # -- checkpoints: the project's own optimizer-state format (zero_state.py) -------------
    state_format = ZERO_STATE_FORMAT

    def stage_state(self, named: list, staging, *, tp_rank: int, pp_rank: int, dp_rank: int) -> list:
        """This rank's fragments of the optimizer state (megatron_state.py), copied into
        ``staging`` (host) as ``optim/tp{T}_pp{P}_dp{D}.safetensors``: no collective. D is the
        DP rank, unique over the (TP, PP) rank's processes, expert-parallel ranks included.
        At zero_stage=0 only the first rank of each replica set writes (DP rank 0 the dense
        parameters, expert-DP rank 0 its experts); a rank with nothing to write writes no file."""
        from ..saving import StagedFile
        from . import megatron_state, zero_state

        if self.cfg.parallel.zero_stage == 0:
            named = [(n, p) for n, p in named if self._replica_rank(p) == 0]
            if not named:
                return []
        step = megatron_state.adam_step(self.optimizer)
        # before the first step there is no state (the file is still written: it marks the
        # checkpoint as this format); bf16: the fp32 masters too (fp32 weights are their own)
        frags = megatron_state.fragments(self.optimizer, named) if step else ()
        tensors = zero_state.stage_views(frags, staging, zero_state.STATE_KEYS + (("master",) if self.bf16 else ()))
        meta = {"format": ZERO_STATE_FORMAT, "adam_step": str(step)}
        return [StagedFile(f"optim/tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.safetensors", tensors, meta)]

    @staticmethod
    def _replica_rank(p) -> int:
        """Rank among the processes holding the same copy of ``p``: the expert-data-parallel
        group for experts (megatron marks them ``allreduce=False``), the DP group otherwise."""
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank() if getattr(p, "allreduce", True) else ps.get_expert_data_parallel_rank()

    def load_state(self, directory, named: list, *, tp_rank: int, pp_rank: int, step: int) -> tuple[int, int]:
        """Optimizer state from ``stage_state`` files written at any DP (and EP) size; the
        weights are already in the module (loaded before the engine was built, so the fp32
        main copies start from them); returns (bytes this rank read, bytes of this (TP, PP)
        rank's state over all writers)."""
        from pathlib import Path

        from . import megatron_state, zero_state

        reader = zero_state.FragmentReader(Path(directory), tp_rank, pp_rank)
        if reader.adam_step:  # else saved before the first step: the optimizer stays fresh
            megatron_state.ensure_state(self.optimizer, reader.adam_step)
            zero_state.fill_views(megatron_state.fragments(self.optimizer, named), reader)
        return reader.bytes_read, reader.total_bytes

    # -- checkpoints written before the project's format (megatron-core's DP-gathered state) --
    def _names(self) -> tuple[str, str]:
        from megatron.core import parallel_state as ps

        tag = f"tp{ps.get_tensor_model_parallel_rank()}_pp{ps.get_pipeline_model_parallel_rank()}"
        ep_rank = ps.get_expert_model_parallel_rank()
        tag += f"_ep{ep_rank}" if ep_rank else ""  # MoE: each expert-parallel rank has its own experts' states
        return f"optim_{tag}.pt", f"common_{tag}.pt"

    def _torch_optimizers(self):
        from .megatron_state import optimizers

        return [o.optimizer for o in optimizers(self.optimizer)]

    def load(self, directory: str, tag: str, model_state: dict | None = None) -> dict:
        """A checkpoint in megatron-core's own format (``engine/optim_tp{T}_pp{P}.pt``, the
        optimizer state gathered over DP, and ``engine/common_tp{T}_pp{P}.pt``), as written
        before ZERO_STATE_FORMAT: loads at any DP size (megatron re-shards it), at the EP size
        that wrote it. The weights come from the model shards first (``model_state``)."""
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
