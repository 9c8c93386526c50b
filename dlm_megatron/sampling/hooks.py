"""Attaching a KV-cache hook to a denoiser's CoreAttention modules (model/attention.py), shared
by the block sampler's exact cache (block.py) and Fast-dLLM's approximate one (cache.py).

The hook is any object with ``extend(module, key, value) -> (key, value)``; keys/values are
[s, b, groups, head_dim] after RoPE.
"""
from __future__ import annotations

import contextlib

import torch


def _attention_modules(model: torch.nn.Module) -> list:
    from ..model.attention import CoreAttention

    mods = [m for m in model.modules() if isinstance(m, CoreAttention)]
    if not mods:
        raise ValueError("the model has no CoreAttention layers (the KV-cache hook): build it with model.transformer_impl=local")
    return mods


@contextlib.contextmanager
def attached(model: torch.nn.Module, cache, mods: list | None = None):
    """Route the model's attention through the hook ``cache`` while the context is open.

    ``mods``: the model's CoreAttention modules if the caller already has them (walking a
    model's module tree costs about a millisecond, once per cached step otherwise)."""
    mods = _attention_modules(model) if mods is None else mods
    for m in mods:
        m.kv_cache = cache
    try:
        yield
    finally:
        for m in mods:
            m.kv_cache = None
