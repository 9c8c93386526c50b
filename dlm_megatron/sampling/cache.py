"""Fast-dLLM's approximate KV cache for masked (bidirectional) diffusion models.

Fast-dLLM v1 (Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM by
Enabling KV Cache and Parallel Decoding"): the sequence is decoded block by block; at the start
of each block one full forward computes every position's keys and values (in every layer, after
RoPE at their own positions) and gives that step's logits. Until the block is complete the
other steps run only

- ``prefix``: the current block and everything after it, attending to the cached keys/values
  of the tokens before the block and to their own fresh ones;
- ``dual``: the current block only, attending to the cached keys/values before *and* after it.

Unlike a causal LM's cache this is an approximation: under bidirectional attention a prefix
token's keys and values depend on the tokens after it, which change as the block is decoded.
At the refresh point the cache is exact (tests check it equals a full forward); between
refreshes it is stale, and docs/BENCHMARKS.md reports how far the logits and the tokens move.

The cache is the ``kv_cache`` hook of the model's CoreAttention modules (model/attention.py):
``extend(module, key, value)`` records the keys/values of a full forward, or splices a window's
fresh keys/values into the cached ones. The rest of the forward is megatron-core's unchanged
model. Keys of different positions are concatenated in position order; attention has no mask
(masked diffusion is bidirectional), so only the RoPE positions matter.

Shape legend: B batch, S sequence, W window (the positions run in a cached step), V vocabulary.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .hooks import _attention_modules, attached

__all__ = ["FastDLLMCache"]


class _SpliceKV:
    """The CoreAttention hook: record (full forward) or splice a window into the record."""

    def __init__(self) -> None:
        self.kv: dict = {}
        self.record = False
        self.window = (0, 0)

    def extend(self, module, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        # key/value: [s, b, groups, head_dim]
        if self.record:
            self.kv[module] = (key, value)
            return key, value
        ck, cv = self.kv[module]
        a, b = self.window
        return torch.cat([ck[:a], key, ck[b:]]), torch.cat([cv[:a], value, cv[b:]])


class FastDLLMCache:
    """Prefix or dual KV cache around a (TP=1) masked-diffusion Denoiser."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, mode: str, *, shift: bool = False) -> None:
        if mode not in ("prefix", "dual"):
            raise ValueError(f"cache mode must be prefix or dual, got {mode!r}")
        _attention_modules(model)  # fail early on a model without the hook
        self.model, self.vocab_size, self.mode, self.shift = model, vocab_size, mode, shift
        self.hook = _SpliceKV()
        self.num_refreshes = 0
        self.tokens_run = 0
        """Token positions run through the model so far (refreshes and cached steps)."""

    def _select(self, out_BWV: Tensor, a: int, lo: int, hi: int) -> Tensor:
        """Logits of positions [lo, hi) from the outputs of positions [a, ...) (shifted models
        read token i from output i-1; token 0 from output 0)."""
        if not self.shift:
            return out_BWV[:, lo - a: hi - a]
        idx = (torch.arange(lo, hi, device=out_BWV.device) - 1).clamp_min(0) - a
        return out_BWV[:, idx]

    @torch.no_grad()
    def full_logits(self, x_BS: Tensor) -> Tensor:
        """A plain full forward (no cache involved).  -> [B, S, V] float32, shift applied."""
        out = self.model(x_BS, None, None)[..., : self.vocab_size].float()
        return self._select(out, 0, 0, x_BS.shape[1])

    @torch.no_grad()
    def capture(self, x_BS: Tensor) -> dict:
        """Keys/values of every attention module for a full forward of x (module -> (k, v))."""
        hook = _SpliceKV()
        hook.record = True
        with attached(self.model, hook):
            self.model(x_BS, None, None)
        return hook.kv

    @torch.no_grad()
    def refresh(self, x_BS: Tensor, lo: int, hi: int) -> Tensor:
        """Full forward of x: cache every position's keys/values.  -> logits of [lo, hi) [B, hi-lo, V]"""
        self.hook = _SpliceKV()
        self.hook.record = True
        try:
            with attached(self.model, self.hook):
                out = self.model(x_BS, None, None)[..., : self.vocab_size].float()
        finally:
            self.hook.record = False
        self.num_refreshes += 1
        self.tokens_run += x_BS.numel()
        return self._select(out, 0, lo, hi)

    @torch.no_grad()
    def block_logits(self, x_BS: Tensor, lo: int, hi: int) -> Tensor:
        """Logits of positions [lo, hi) from a cached step.  -> [B, hi-lo, V]

        Runs the window [a, hi) (dual) or [a, S) (prefix), a = lo (lo - 1 for a shifted model,
        whose token lo is read from output lo - 1), with the cached keys/values elsewhere."""
        S = x_BS.shape[1]
        a = max(lo - (1 if self.shift else 0), 0)
        b = hi if self.mode == "dual" else S
        tokens = x_BS[:, a:b]
        positions = torch.arange(a, b, device=x_BS.device).expand(x_BS.shape[0], -1)
        self.hook.window = (a, b)
        with attached(self.model, self.hook):
            out = self.model(tokens, positions, None, explicit_positions=True)[..., : self.vocab_size].float()
        self.tokens_run += tokens.numel()
        return self._select(out, a, lo, hi)
