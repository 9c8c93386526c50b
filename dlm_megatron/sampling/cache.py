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
fresh keys/values into the cached ones (in place, in position order). The rest of the forward
is megatron-core's unchanged model; attention has no mask (masked diffusion is bidirectional),
so only the RoPE positions matter. Only the masked block positions' logits are ever read, so
only those go through the output layer (``need_L``; docs/BENCHMARKS.md has where a cached
step's time goes).

Shape legend: B batch, S sequence, W window (the positions run in a cached step), V vocabulary.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .hooks import _attention_modules, attached

MIN_OUTPUT_ROWS = 8
"""Fewest rows sent through the output layer when only some positions' logits are needed.
Below 4 rows MKL's fp32 GEMM takes a GEMV path that rounds differently (measured on this
project's CPUs): with at least 8 rows the needed rows' logits are bit-identical to those of
the unrestricted output layer, and 8 rows cost about what 1 does (the weight read dominates)."""

__all__ = ["FastDLLMCache"]


class _SpliceKV:
    """The CoreAttention hook: record (full forward) or splice a window into the record.

    The record is one preallocated [S, b, groups, head_dim] key and value buffer per module,
    filled by the full forward. A cached step writes the window's fresh keys/values into the
    buffers in place and hands the buffers to attention: the same tensors torch.cat of
    (cache before, window, cache after) would give, without copying the whole sequence per
    layer and step. The window's slots are never read from the record (every cached step of a
    block overwrites the same window before attention reads it), so overwriting them loses
    nothing; after a cached step ``kv`` holds the refresh's keys/values outside the window and
    that step's inside it."""

    def __init__(self) -> None:
        self.kv: dict = {}
        self.record = False
        self.window = (0, 0)

    def extend(self, module, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        # key/value: [s, b, groups, head_dim]
        if self.record:
            self.kv[module] = (key.clone(memory_format=torch.contiguous_format),
                               value.clone(memory_format=torch.contiguous_format))
            return key, value
        ck, cv = self.kv[module]
        a, b = self.window
        ck[a:b] = key
        cv[a:b] = value
        return ck, cv


class FastDLLMCache:
    """Prefix or dual KV cache around a (TP=1) masked-diffusion Denoiser."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, mode: str, *, shift: bool = False) -> None:
        if mode not in ("prefix", "dual"):
            raise ValueError(f"cache mode must be prefix or dual, got {mode!r}")
        self.modules = _attention_modules(model)  # fails early on a model without the hook
        self.model, self.vocab_size, self.mode, self.shift = model, vocab_size, mode, shift
        self.hook = _SpliceKV()
        self.num_refreshes = 0
        self.tokens_run = 0
        """Token positions run through the model so far (refreshes and cached steps)."""
        self.output_rows = 0
        """Positions run through the output layer so far (per batch row)."""

    def _output_index(self, tok_L: Tensor, a: int) -> Tensor:
        """Rows, in the outputs of positions [a, ...), that hold the logits of token positions
        tok_L (shifted models read token i from output i-1; token 0 from output 0)."""
        return ((tok_L - 1).clamp_min(0) if self.shift else tok_L) - a

    def _select(self, out_BWV: Tensor, a: int, lo: int, hi: int) -> Tensor:
        """Logits of positions [lo, hi) from the outputs of positions [a, ...)."""
        if not self.shift:
            return out_BWV[:, lo - a: hi - a]
        return out_BWV[:, self._output_index(torch.arange(lo, hi, device=out_BWV.device), a)]

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

    def _output_positions(self, a: int, b: int, lo: int, hi: int, need_L: Tensor | None) -> Tensor | None:
        """Positions (relative to the run window [a, b)) whose outputs give the logits of the
        needed block positions (need_L [L] bool over [lo, hi); None: all), padded with the
        next window positions up to MIN_OUTPUT_ROWS.  -> sorted [n] long, or None for all."""
        if need_L is None:
            return None
        rows = torch.zeros(b - a, dtype=torch.bool)
        rows[self._output_index(torch.arange(lo, hi)[need_L.cpu()], a)] = True
        short = min(MIN_OUTPUT_ROWS, b - a) - int(rows.sum())
        if short > 0:  # pad with the first unneeded positions (cheap, keeps the GEMM's rounding)
            rows[(~rows).nonzero().squeeze(1)[:short]] = True
        return None if bool(rows.all()) else rows.nonzero().squeeze(1)

    def _forward(self, tokens_BW: Tensor, positions_BW: Tensor | None, rows_n: Tensor | None) -> Tensor:
        """The model on the window with the hook attached.  -> [B, W, V] float32; with rows_n only
        those window positions are run through the output layer, the others' logits are 0."""
        B, W = tokens_BW.shape
        kw = {} if positions_BW is None else dict(explicit_positions=True)
        if rows_n is not None:
            kw["logit_positions"] = rows_n.to(tokens_BW.device)
        # inference_mode, not just no_grad: no version counters / view tracking on the ~500 ops of a
        # forward (about 3% of a cached 32-token step here; same kernels, same numbers).
        with torch.inference_mode(), attached(self.model, self.hook, self.modules):
            out = self.model(tokens_BW, positions_BW, None, **kw)[..., : self.vocab_size].float()
        self.tokens_run += tokens_BW.numel()
        self.output_rows += W if rows_n is None else rows_n.numel()
        if rows_n is None:
            return out
        full = out.new_zeros(B, W, out.shape[-1])
        full[:, rows_n.to(full.device)] = out
        return full

    @torch.no_grad()
    def refresh(self, x_BS: Tensor, lo: int, hi: int, need_L: Tensor | None = None) -> Tensor:
        """Full forward of x: cache every position's keys/values.  -> logits of [lo, hi) [B, hi-lo, V]

        need_L [hi-lo] bool: the block positions whose logits the caller reads (the masked
        ones); only those (MIN_OUTPUT_ROWS at least) go through the output layer, the other
        positions' logits are 0. None: every position's logits."""
        S = x_BS.shape[1]
        self.hook = _SpliceKV()
        self.hook.record = True
        try:
            out = self._forward(x_BS, None, self._output_positions(0, S, lo, hi, need_L))
        finally:
            self.hook.record = False
        self.num_refreshes += 1
        return self._select(out, 0, lo, hi)

    @torch.no_grad()
    def block_logits(self, x_BS: Tensor, lo: int, hi: int, need_L: Tensor | None = None) -> Tensor:
        """Logits of positions [lo, hi) from a cached step.  -> [B, hi-lo, V]

        Runs the window [a, hi) (dual) or [a, S) (prefix), a = lo (lo - 1 for a shifted model,
        whose token lo is read from output lo - 1), with the cached keys/values elsewhere.
        need_L as in refresh."""
        S = x_BS.shape[1]
        a = max(lo - (1 if self.shift else 0), 0)
        b = hi if self.mode == "dual" else S
        positions = torch.arange(a, b, device=x_BS.device).expand(x_BS.shape[0], -1)
        self.hook.window = (a, b)
        out = self._forward(x_BS[:, a:b], positions, self._output_positions(a, b, lo, hi, need_L))
        return self._select(out, a, lo, hi)
