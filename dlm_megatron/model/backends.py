"""Which attention kernel a run uses (no megatron-core import: the planner needs it too)."""
from __future__ import annotations

import torch

BACKENDS = ("auto", "dense", "sdpa", "flex")


def resolve_backend(name: str, *, block: bool = False, cuda: bool | None = None) -> str:
    """The kernel ``model.attention_backend=name`` runs. ``auto``: flex for block diffusion's
    2L mask on CUDA (block-sparse), sdpa otherwise (flash / fused kernels, any mask)."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    on_cuda = torch.cuda.is_available() if cuda is None else cuda
    return "flex" if block and on_cuda else "sdpa"
