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


def uses_arbitrary_masks(cfg) -> bool:
    """Whether a run of ``cfg`` gives attention per-batch boolean masks: block diffusion's 2L
    mask, AR->diffusion annealing (diffusion.anneal_steps > 0) or data.document_masks."""
    d = cfg.diffusion
    return d.objective == "block" or d.anneal_steps > 0 or bool(cfg.data.document_masks)


def attention_kernel(cfg, impl: str, *, cuda: bool | None = None) -> str:
    """The core attention a run of ``cfg`` uses with layer implementation ``impl`` ('local' or
    'transformer_engine'): 'te' (TE's own attention, fused kernels for no mask and causal) with
    the TE spec when no arbitrary mask is needed; otherwise the project's kernel that
    ``model.attention_backend`` resolves to, because TE runs arbitrary masks on its unfused
    path (the s x s scores in memory). The layer spec and the planner both ask this."""
    if impl == "transformer_engine" and not uses_arbitrary_masks(cfg):
        return "te"
    return resolve_backend(cfg.model.attention_backend, block=cfg.diffusion.objective == "block", cuda=cuda)
