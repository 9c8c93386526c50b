"""Process-group setup from torchrun, Slurm or a plain single process.

``init_distributed(cfg)`` creates the default group (NCCL on GPU, gloo on CPU), then
megatron-core's tensor/pipeline/data-parallel groups. DP size is derived:
world / (tp * pp). Layout problems are ConfigErrors naming the keys to change.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError
from . import cpu_compat


@dataclass
class Layout:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    ep: int = 1
    ep_rank: int = 0
    expert_dp_rank: int = 0
    """Rank in the expert-data-parallel group (ranks holding the same experts)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0].split("[")[0]


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Slurm's environment (else 0, 1, 0)."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


def init_distributed(cfg, timeout_minutes: int = 30) -> Layout:
    """Initialise torch.distributed and megatron-core parallel state for ``cfg.parallel``."""
    cpu_compat.apply()
    rank, world, local = env_rank_world()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp):
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tp*parallel.pp={tp}*{pp}; "
            f"launch a multiple of {tp * pp} processes (NPROC=...) or change the layout"
        )
    dp = world // (tp * pp)
    ep = cfg.parallel.ep
    if dp % ep:
        raise ConfigError(f"parallel.ep={ep} must divide the data-parallel size {dp} (world {world} / (tp*pp)); "
                          f"launch a multiple of {tp * pp * ep} processes or change parallel.ep")
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gbs % (mbs * dp):
        raise ConfigError(
            f"train.global_batch_size={gbs} must be a multiple of train.micro_batch_size*dp={mbs}*{dp}"
        )
    # DeepSpeed insists on LOCAL_RANK even for a single plain process.
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        if "MASTER_ADDR" not in os.environ:
            host = _first_slurm_host()
            if host is None:
                raise ConfigError("MASTER_ADDR is not set: launch with torchrun or srun (see launch/)")
            os.environ["MASTER_ADDR"] = host
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size() != tp or ps.get_pipeline_model_parallel_world_size() != pp
        or ps.get_expert_model_parallel_world_size() != ep
    ):
        # Another layout in the same process (tests run several layouts per torchrun launch):
        # subgroups can be rebuilt, the default group stays.
        ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        # Expert-parallel groups (MoE) are carved out of the data-parallel ranks here, with the
        # others: megatron-core's MoE layers and DDP read them from parallel_state.
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep)
    if use_cuda:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    return Layout(
        rank=rank,
        world_size=world,
        local_rank=local,
        tp=tp,
        pp=pp,
        dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
        ep=ep,
        ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
    )


class DeepSpeedMPU:
    """The model-parallel interface DeepSpeed expects, on top of megatron-core's state.

    megatron-core's parallel_state lacks get_model_parallel_{rank,world_size,group}; for
    DeepSpeed the "model-parallel" group is the tensor-parallel group (PP runs under
    megatron-core's own optimizer, see engine/).
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
