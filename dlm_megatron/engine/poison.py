"""Test hooks that make a step non-finite on purpose (``DLM_TEST_INJECT_NAN_STEPS``,
``DLM_TEST_INJECT_NAN_GRAD_STEPS`` and ``DLM_TEST_INJECT_NAN_LAST_RANK_STEPS`` in train.py),
so the engines' skip paths are exercised end to end: a non-finite loss on every rank; a
finite loss whose gradient is non-finite (what an overflow inside the backward pass looks
like); and a non-finite loss value on one rank only, with a finite gradient, so that no
other rank can see it in its own losses or gradients: only the ranks' agreement on the flag
makes them all skip."""
from __future__ import annotations

import torch

KINDS = (None, "loss", "grad", "loss_last_rank")


class _ZeroWithNaNGrad(torch.autograd.Function):
    """Forward: an exact 0. Backward: NaN into every element of the input (the model's
    output), whatever the loss weights are (a micro-batch with no masked token still gets it)."""

    @staticmethod
    def forward(ctx, out):
        ctx.shape, ctx.dtype = out.shape, out.dtype
        return out.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"), dtype=ctx.dtype, device=grad.device)


def poison_loss(loss: torch.Tensor) -> torch.Tensor:
    """The loss times NaN (value and gradient non-finite)."""
    return loss * float("nan")


def poisons_loss(kind) -> bool:
    """Whether ``kind`` makes this rank's loss non-finite: "loss" everywhere, "loss_last_rank"
    on the last data-parallel rank (of the stage that computes the loss)."""
    if kind == "loss":
        return True
    if kind != "loss_last_rank":
        return False
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank() == ps.get_data_parallel_world_size() - 1


def poisoned_loss(kind, loss: torch.Tensor) -> torch.Tensor:
    """This rank's loss under ``kind`` (call where :func:`poisons_loss` is true): "loss" times
    NaN; "loss_last_rank" a NaN value whose gradient is the loss's own, finite one."""
    if kind == "loss":
        return poison_loss(loss)
    return loss + torch.full_like(loss.detach(), float("nan"))


def poison_grad(loss: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The same finite loss value, with a NaN gradient flowing back from the model output
    ``out`` into every parameter that produced it."""
    return loss + _ZeroWithNaNGrad.apply(out)


def check(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"poison must be one of {KINDS}, got {kind!r}")
