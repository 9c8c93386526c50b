"""Block-diffusion (BD3-LM) sampler: semi-autoregressive blocks with a KV cache.

The sequence is generated one block of ``block_length`` tokens at a time, left to right.
Blocks sit on the training grid (block j covers positions [j*K, (j+1)*K)), so when the
prompt length is not a multiple of K the first block is completed in place: its prompt
tokens stay fixed, like the unmasked tokens of a training block. Each block starts fully
masked and is denoised in ``steps_per_block`` steps with the masked sampler's knobs
(temperature schedule, remasking rule, renoising, confidence threshold; the helpers of
sampling/masked.py). A block sees itself bidirectionally and every earlier clean token,
exactly like an x_t block in training; finished blocks see only blocks up to their own
(block-causal), like the x_0 half.

KV cache (the design choice): finished blocks never change, and what they contribute to
later blocks is, in every layer, their keys and values (after RoPE at their own
positions). ``CachedDenoiser`` runs each finished block once through the unchanged
megatron-core model with a ``KVCache`` attached to the model's CoreAttention
modules (model/attention.py): the hook prepends the cached keys/values and, on the commit
pass, keeps the new ones. A denoising step then costs one forward over K tokens instead of
the whole prefix. ``RecomputeDenoiser`` recomputes the full forward (prefix + block under
the block-causal mask) at every step; it is the reference the cache is tested against (same
logits to float precision) and the benchmark baseline.

The model runs in one process (TP = PP = 1), as in generate.py, which merges checkpoints.

Shape legend: B batch, P prompt length, K block length, N tokens in one model call,
C cached (clean) tokens, V vocabulary.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..diffusion.block import block_causal_mask
from .hooks import _attention_modules, attached
from .masked import SamplerConfig, denoise_block, guided_logits

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
    ``cfg.steps_per_block`` denoising steps per block, with the masked sampler's knobs
    (acceptance profile, renoising profile, thresholds, temperature schedule; denoise_step).
    Returns [B, P + gen_length].
    use_cache=False recomputes the whole prefix at every step (reference / benchmark).
    on_logits(block_start, step, logits [B, K, V]) sees every step's logits (tests).
    Rows that produced ``eos_id`` in a finished block get their later blocks filled with
    it; generation stops when every row has. ``cfg.stop_at_eos``: a committed EOS also fills
    the rest of its block. ``cfg.cfg_scale`` > 0: classifier-free guidance, the unconditional
    rows (prompt masked) run alongside with their own cache. ``cfg.cache`` is the masked
    sampler's option: finished blocks here are always cached exactly.
    """
    cfg.validate()
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
    if cfg.cache != "none":
        raise ValueError(f"cache={cfg.cache} is the masked sampler's approximate cache; the block sampler "
                         f"always caches finished blocks exactly (use_cache), set cache=none")
    if cfg.stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos needs eos_id")
    batch, prompt_len = prompt_ids.shape
    bs, k = cfg.block_length, cfg.steps_per_block
    total = prompt_len + cfg.gen_length
    first = prompt_len // bs * bs  # first block with something to generate
    end = -(-total // bs) * bs
    device = prompt_ids.device
    generator = torch.Generator().manual_seed(cfg.seed)
    suppress = sorted({int(mask_id), *(int(i) for i in suppress_ids)})
    guided = cfg.cfg_scale > 0.0

    def rows(tokens_BN: Tensor, start: int) -> Tensor:
        """Model rows for positions [start, start + N): with guidance, also the prompt-masked copy."""
        if not guided:
            return tokens_BN
        unc = tokens_BN.clone()
        unc[:, : max(0, min(prompt_len - start, unc.shape[1]))] = mask_id
        return torch.cat([tokens_BN, unc])

    x = torch.full((batch, end), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids
    runner = (CachedDenoiser if use_cache else RecomputeDenoiser)(model, vocab_size, bs)
    if first > 0:
        runner.commit(rows(x[:, :first], 0))
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    for lo in range(first, end, bs):
        hi = lo + bs
        if eos_id is not None:
            blk = x[:, lo:hi]
            x[:, lo:hi] = torch.where(done[:, None] & (blk == mask_id), eos_id, blk)

        def block_logits(i: int, masked: Tensor) -> Tensor:
            logits = runner.block_logits(rows(x[:, lo:hi], lo))
            if guided:
                logits = guided_logits(logits[:batch], logits[batch:], cfg.cfg_scale)
            if on_logits is not None:
                on_logits(lo, i, logits)
            return logits

        denoise_block(x, lo, hi, block_logits, cfg, mask_id, suppress, generator, eos_id=eos_id, gen_from=prompt_len)
        if eos_id is not None:
            done |= (x[:, prompt_len:hi] == eos_id).any(dim=1)
            if bool(done.all()):
                x[:, hi:] = eos_id
                break
        if hi < end:
            runner.commit(rows(x[:, lo:hi], lo))
    return x[:, :total]
