"""FROZEN copy of dlm_megatron/sampling/block.py as of commit 4335038 (before issue 14): the block
sampler at its default knobs must give these tokens bit for bit. Do not edit."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm_megatron.diffusion.block import block_causal_mask
from legacy_masked_sampler import (
    SamplerConfig,
    confidence,
    num_transfer_tokens,
    remask_committed,
    sample_tokens,
    select_top,
    temperature_at,
)

__all__ = ["CachedDenoiser", "KVCache", "RecomputeDenoiser", "generate_blocks", "prefix_block_mask"]


def prefix_block_mask(start: int, n: int, block_size: int) -> Tensor | None:
    """Mask of tokens [start, start+N) over keys [0, start+N) under block-causal attention.

    -> [1, 1, N, start+N] bool (True = masked out), or None when nothing is masked out (the
    usual case: N tokens inside one block see all of it and all earlier tokens)."""
    mask = block_causal_mask(start + n, block_size)[:, :, start:]
    return mask if bool(mask.any()) else None


class KVCache:
    """Keys/values of the clean prefix, per attention module: [C, B, groups, head_dim] each."""

    def __init__(self) -> None:
        self._kv: dict = {}
        self.append = False
        """When True (commit pass), the keys/values of the tokens being run are kept."""
        self.length = 0
        """C, number of cached tokens."""

    def extend(self, module, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Called by each attention module: cached + new keys/values along the sequence dim."""
        prev = self._kv.get(module)
        if prev is not None:
            key, value = torch.cat([prev[0], key]), torch.cat([prev[1], value])
        if self.append:
            self._kv[module] = (key, value)
        return key, value


def _attention_modules(model: torch.nn.Module) -> list:
    from dlm_megatron.model.attention import CoreAttention

    mods = [m for m in model.modules() if isinstance(m, CoreAttention)]
    if not mods:
        raise ValueError("the model has no CoreAttention layers: build it with diffusion.objective=block")
    return mods


@contextlib.contextmanager
def attached(model: torch.nn.Module, cache: KVCache):
    """Route the model's attention through ``cache`` for the duration of the block."""
    mods = _attention_modules(model)
    for m in mods:
        m.kv_cache = cache
    try:
        yield
    finally:
        for m in mods:
            m.kv_cache = None


def _logits(model, tokens_BN: Tensor, start: int, mask, vocab_size: int) -> Tensor:
    """One forward at positions start..start+N-1.  -> [B, N, V] float32 (padded vocab cut)."""
    positions = torch.arange(start, start + tokens_BN.shape[1], device=tokens_BN.device).expand(tokens_BN.shape[0], -1)
    mask = None if mask is None else mask.to(tokens_BN.device)
    out = model(tokens_BN, positions, mask, explicit_positions=True)
    return out[..., :vocab_size].float()


class CachedDenoiser:
    """Clean tokens run once and stay as per-layer keys/values; each step runs the block only."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, block_size: int) -> None:
        self.model, self.vocab_size, self.block_size = model, vocab_size, block_size
        self.cache = KVCache()
        _attention_modules(model)  # fail early on a model without the hook

    def commit(self, tokens_BN: Tensor) -> None:
        """Append clean tokens (positions C..C+N-1, block-causal among themselves) to the cache."""
        start = self.cache.length
        self.cache.append = True
        try:
            with attached(self.model, self.cache):
                _logits(self.model, tokens_BN, start, prefix_block_mask(start, tokens_BN.shape[1], self.block_size), self.vocab_size)
        finally:
            self.cache.append = False
        self.cache.length += tokens_BN.shape[1]

    def block_logits(self, block_BK: Tensor) -> Tensor:
        """Logits of the current block, which follows the cached tokens.  -> [B, K, V]"""
        start = self.cache.length
        with attached(self.model, self.cache):
            return _logits(self.model, block_BK, start, prefix_block_mask(start, block_BK.shape[1], self.block_size), self.vocab_size)


class RecomputeDenoiser:
    """No cache: every step runs the model on [clean prefix ; block] (the reference)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, block_size: int) -> None:
        self.model, self.vocab_size, self.block_size = model, vocab_size, block_size
        self.clean: Tensor | None = None

    def commit(self, tokens_BN: Tensor) -> None:
        self.clean = tokens_BN if self.clean is None else torch.cat([self.clean, tokens_BN], dim=1)

    def block_logits(self, block_BK: Tensor) -> Tensor:
        tokens = block_BK if self.clean is None else torch.cat([self.clean, block_BK], dim=1)
        start = tokens.shape[1] - block_BK.shape[1]
        logits = _logits(self.model, tokens, 0, prefix_block_mask(0, tokens.shape[1], self.block_size), self.vocab_size)
        return logits[:, start:]


def denoise_step(logits_BKV: Tensor, masked_BK: Tensor, i: int, k: int, cfg: SamplerConfig, suppress: Sequence[int],
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Step i of k on one block: (candidate tokens [B, K], which to commit [B, K] bool).

    The same rule as the masked sampler: candidates drawn at temperature T(t = 1 - i/k),
    ranked by the remasking rule on the untempered probabilities, and as many committed as
    the linear acceptance profile over the remaining steps asks (at least every position
    above the confidence threshold, and at least one)."""
    logits = logits_BKV.double().index_fill(-1, torch.tensor(list(suppress), device=logits_BKV.device), -math.inf)
    x0 = sample_tokens(logits, temperature_at(1.0 - i / k, cfg), generator)
    score = confidence(F.softmax(logits, dim=-1), x0, cfg.remasking, generator)
    masked = masked_BK.to(logits.device)
    n = num_transfer_tokens(masked.sum(dim=1), k - i)[:, 0]
    if cfg.confidence_threshold is not None:
        n_confident = ((score >= cfg.confidence_threshold) & masked).sum(dim=1)
        n = torch.maximum(torch.maximum(n, n_confident), masked.any(dim=1).long())
    return x0, select_top(score, masked, n)


@torch.no_grad()
def generate_blocks(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    mask_id: int,
    cfg: SamplerConfig,
    *,
    vocab_size: int,
    use_cache: bool = True,
    eos_id: int | None = None,
    suppress_ids: Sequence[int] = (),
    on_logits: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """Generate ``cfg.gen_length`` tokens after ``prompt_ids`` [B, P] with a block-diffusion model.

    ``cfg.block_length`` must be the block size the model was trained with;
    ``cfg.steps_per_block`` denoising steps per block. Returns [B, P + gen_length].
    use_cache=False recomputes the whole prefix at every step (reference / benchmark).
    on_logits(block_start, step, logits [B, K, V]) sees every step's logits (tests).
    Rows that produced ``eos_id`` in a finished block get their later blocks filled with
    it; generation stops when every row has.
    """
    cfg.validate()
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
    batch, prompt_len = prompt_ids.shape
    bs, k = cfg.block_length, cfg.steps_per_block
    total = prompt_len + cfg.gen_length
    first = prompt_len // bs * bs  # first block with something to generate
    end = -(-total // bs) * bs
    device = prompt_ids.device
    generator = torch.Generator().manual_seed(cfg.seed)
    suppress = sorted({int(mask_id), *(int(i) for i in suppress_ids)})

    x = torch.full((batch, end), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids
    runner = (CachedDenoiser if use_cache else RecomputeDenoiser)(model, vocab_size, bs)
    if first > 0:
        runner.commit(x[:, :first])
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    for lo in range(first, end, bs):
        hi = lo + bs
        if eos_id is not None:
            blk = x[:, lo:hi]
            x[:, lo:hi] = torch.where(done[:, None] & (blk == mask_id), eos_id, blk)
        committed = torch.zeros(batch, bs, dtype=torch.bool, device=device)
        for i in range(k):
            if cfg.renoise_prob > 0.0:
                # Only tokens sampled in this block are renoised, never the prompt.
                remask = remask_committed(committed, cfg.renoise_prob, generator)
                x[:, lo:hi] = x[:, lo:hi].masked_fill(remask, mask_id)
                committed &= ~remask
            masked = x[:, lo:hi] == mask_id
            if not bool(masked.any()):
                break
            logits = runner.block_logits(x[:, lo:hi])
            if on_logits is not None:
                on_logits(lo, i, logits)
            x0, commit = denoise_step(logits, masked, i, k, cfg, suppress, generator)
            commit = commit.to(device)
            x[:, lo:hi] = torch.where(commit, x0.to(device), x[:, lo:hi])
            committed |= commit
        if eos_id is not None:
            done |= (x[:, prompt_len:hi] == eos_id).any(dim=1)
            if bool(done.all()):
                x[:, hi:] = eos_id
                break
        if hi < end:
            runner.commit(x[:, lo:hi])
    return x[:, :total]
