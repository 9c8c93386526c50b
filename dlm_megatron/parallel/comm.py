"""Every torch.distributed collective of the package goes through here.

Why one module: NCCL reduces CUDA tensors only and gloo CPU tensors only (gloo's CUDA support
is partial), so a collective is correct only when its tensor lives on the device its
group's backend needs. Code elsewhere builds host flags and scalars freely; the helpers here
move them to :func:`backend_device` and back. ``tests/unit/test_comm.py`` scans the package
and fails if any other module calls a collective directly (process-group management —
init, new_group, destroy, get_rank/world_size, barrier — stays where it is).

Two kinds of helper:

- in-place on a tensor that already lives where the model computes (``all_reduce_``):
  activations, logits, gradients. On an NCCL group it must be a CUDA tensor; passing a CPU
  tensor raises at once, naming the bug, instead of NCCL's opaque error.
- host values (``all_reduce_host``, ``sum_host``, ``max_host``): Python numbers or CPU tensors
  that are reduced on the backend's device and returned on the host. Each is one host sync:
  call them once per step, never per micro-batch.

``group=None`` is the default (world) group everywhere.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SUM = dist.ReduceOp.SUM
MAX = dist.ReduceOp.MAX
MIN = dist.ReduceOp.MIN


def _ops(op) -> dist.ReduceOp:
    if isinstance(op, str):
        return {"sum": SUM, "max": MAX, "min": MIN}[op]
    return op


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def backend_device(group=None) -> torch.device:
    """The device a collective on ``group`` needs: this rank's CUDA device for NCCL, else CPU."""
    backend = str(dist.get_backend(group)).lower()
    return device_for_backend(backend)


def device_for_backend(backend: str) -> torch.device:
    """'nccl' -> this rank's CUDA device; anything else (gloo, mpi) -> cpu."""
    if "nccl" in backend.lower():
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cuda")
    return torch.device("cpu")


def _check_device(t: torch.Tensor, group, what: str) -> None:
    want = backend_device(group)
    if t.device.type != want.type:
        raise RuntimeError(f"{what}: tensor on {t.device} but the group's backend ({dist.get_backend(group)}) "
                           f"needs {want.type}; use comm.all_reduce_host for host values")


# ---------------------------------------------------------------------------------------
# In-place collectives on device tensors


def all_reduce_(t: torch.Tensor, op="sum", group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor already on the backend's device; returns it."""
    if not is_distributed():
        return t
    _check_device(t, group, "all_reduce_")
    dist.all_reduce(t, op=_ops(op), group=group)
    return t


def broadcast_(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` of a tensor on the backend's device."""
    if not is_distributed():
        return t
    _check_device(t, group, "broadcast_")
    dist.broadcast(t, src=src, group=group)
    return t


def all_reduce_any_device_(t: torch.Tensor, op="sum", group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor on any device: moved to the backend's device and back
    if it is elsewhere (one copy each way; for small tensors off the hot path)."""
    if not is_distributed():
        return t
    dev = backend_device(group)
    if t.device.type == dev.type:
        dist.all_reduce(t, op=_ops(op), group=group)
        return t
    moved = t.to(dev)
    dist.all_reduce(moved, op=_ops(op), group=group)
    t.copy_(moved.to(t.device))
    return t


# ---------------------------------------------------------------------------------------
# Host values (one sync each)


def all_reduce_host(values, op="sum", group=None, dtype=torch.float64) -> torch.Tensor:
    """Reduce a number, a list of numbers or a CPU tensor across ``group``; returns a CPU tensor."""
    t = values.detach().to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if not is_distributed():
        return t.cpu()
    dev = backend_device(group)
    t = t.to(dev)
    dist.all_reduce(t, op=_ops(op), group=group)
    return t.cpu()


def sum_host(x: float, group=None) -> float:
    """Sum of a Python number over ``group``."""
    return float(all_reduce_host([x], "sum", group)[0])


def max_host(x: float, group=None) -> float:
    """Max of a Python number over ``group`` (e.g. a stop flag: any rank's 1 stops all)."""
    return float(all_reduce_host([x], "max", group)[0])


def any_flag(flag: torch.Tensor, group=None) -> torch.Tensor:
    """Logical OR of a boolean/0-1 tensor over ``group``, kept on its device (no host sync).

    ``flag`` lives where it was computed (e.g. ``~torch.isfinite(loss)`` on the GPU); the
    result is a float tensor on the same device, 1.0 where any rank had True."""
    f = flag.detach().float().reshape(-1).clone()
    return all_reduce_any_device_(f, "max", group)
