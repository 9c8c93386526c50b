"""Test hooks that make a step non-finite on purpose (``DLM_TEST_INJECT_NAN_STEPS`` and
``DLM_TEST_INJECT_NAN_GRAD_STEPS`` in train.py), so the engines' skip paths are exercised
end to end: a non-finite loss, and a finite loss whose gradient is non-finite (what an
overflow inside the backward pass looks like)."""
from __future__ import annotations

import torch

KINDS = (None, "loss", "grad")


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


def poison_grad(loss: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The same finite loss value, with a NaN gradient flowing back from the model output
    ``out`` into every parameter that produced it."""
    return loss + _ZeroWithNaNGrad.apply(out)


def check(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"poison must be one of {KINDS}, got {kind!r}")
