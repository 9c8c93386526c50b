"""Core attention backends, behind megatron-core's core-attention interface.

``CoreAttention`` takes the place of megatron-core's core attention (the softmax(QK^T)V step
that runs after linear_qkv and RoPE, before linear_proj) in the local layer spec of every
objective, and in the Transformer Engine spec of runs with arbitrary masks (block diffusion,
annealing, document masks; ``backends.attention_kernel``). It is called exactly like
DotProductAttention: query [sq, b, np, hn], key/value [sk, b, ng, hn], boolean mask
[1 or b, 1, sq or 1, sk] (True = may NOT attend) or None (the layer's mask type decides:
no mask, or causal); it returns [sq, b, np * hn]. ``model.attention_backend`` picks the kernel:

- ``dense``: megatron-core's own DotProductAttention (scores [b, np, sq, sk] materialised,
  softmax in fp32 when the model is bf16). Runs everywhere; the reference the others are
  tested against.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``: flash / cuDNN kernels on
  CUDA for no mask and causal (nothing s x s is stored), memory-efficient attention with a
  boolean mask, the fused CPU kernel here. No Transformer Engine needed.
- ``flex``: torch FlexAttention with a BlockMask. Tiles (128 x 128) where no query may see any
  key are skipped, and tiles where every pair is allowed skip the mask lookup: for the 2L
  block-diffusion mask about half the tiles are empty. Compiled (fused kernel) on CUDA; on
  CPU torch only has an eager forward, so CPU runs use it for forward checks only.
- ``auto``: flex for block diffusion on CUDA, sdpa everywhere else (dense only for softmax
  variants the fused kernels do not implement).

The flex kernel turns the mask it is given into a BlockMask once per forward (all layers
receive the same tensor object, so the result is reused across layers): if it equals the
2L block-diffusion mask of this model's block size, an analytic mask_mod with a BlockMask
cached per (L, block size, device) is used (no dense lookups inside the kernel, no
recompilation between steps); any other mask (the sampler's, the per-block reference loop's)
is looked up from the dense tensor.

KV cache: when ``kv_cache`` is set (by the samplers), the layer's keys/values are passed
through ``kv_cache.extend(self, key, value)``, which prepends the cached keys/values of
earlier tokens (already rotated by RoPE at their own positions) and may append the new
ones. Everything else in the model runs unchanged, so a cached forward uses megatron-core's
own norms, projections, RoPE and MLP.

TP/PP: the module sees only its TP shard of the heads and needs nothing rank-specific; the
mask is built from the batch identically on every rank.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from ..diffusion import block as bd
from .backends import BACKENDS, resolve_backend  # noqa: F401  (re-exported)

def core_attention_builder(backend: str, block_size: int | None, *, block: bool) -> Callable[..., "CoreAttention"]:
    """What the layer spec plugs in as ``core_attention`` (megatron calls it with keyword args)."""
    return functools.partial(CoreAttention, backend=resolve_backend(backend, block=block), block_size=block_size)


# ---------------------------------------------------------------------------------------
# BlockMasks


@functools.lru_cache(maxsize=8)
def _dense_2l_mask(seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    return bd.block_diffusion_mask(seq_len, block_size).to(device)


@functools.lru_cache(maxsize=8)
def block_mask_2l(seq_len: int, block_size: int, device: torch.device):
    """BlockMask of the 2L block-diffusion layout from its analytic mask_mod (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return bd.allowed_2l(q_idx, kv_idx, seq_len, block_size)

    S = 2 * seq_len
    return create_block_mask(mask_mod, None, None, S, S, device=device, _compile=False)


def block_mask_from_dense(mask_b1qk: torch.Tensor):
    """BlockMask that allows exactly what a boolean mask (True = masked out) allows.

    mask: [1 or b, 1, sq, sk]. The kernel looks the mask up only in partially-masked tiles."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed = ~mask_b1qk[:, 0]
    per_sample = allowed.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b if per_sample else 0, q_idx, kv_idx]

    _, sq, sk = allowed.shape
    return create_block_mask(mask_mod, allowed.shape[0] if per_sample else None, None, sq, sk,
                             device=mask_b1qk.device, _compile=False)


def block_mask_for(mask, sq: int, sk: int, block_size: int | None, device: torch.device):
    """The BlockMask for a dense mask (None = no mask): analytic when it is the 2L mask."""
    if mask is None:
        return None
    if block_size and sq == sk and sq % (2 * block_size) == 0:
        L = sq // 2
        ref = _dense_2l_mask(L, block_size, device)
        if mask.shape[0] == 1 and torch.equal(mask, ref):
            return block_mask_2l(L, block_size, device)
    return block_mask_from_dense(mask)


# One entry shared by all layers: the mask of the forward pass in flight.
_LAST: dict = {}


def _cached_block_mask(mask, sq: int, sk: int, block_size: int | None, device: torch.device):
    key = (sq, sk, block_size, device)
    if _LAST.get("mask") is mask and _LAST.get("key") == key:
        return _LAST["block_mask"]
    bm = block_mask_for(mask, sq, sk, block_size, device)
    _LAST.update(mask=mask, key=key, block_mask=bm)
    return bm


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_fn(device: torch.device):
    """Compiled FlexAttention on CUDA (the fused block-sparse kernel); eager elsewhere."""
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


# ---------------------------------------------------------------------------------------
# The module


class CoreAttention(DotProductAttention):
    """megatron-core core attention with a dense, SDPA or FlexAttention kernel and a KV-cache hook."""

    def __init__(self, *args, backend: str = "dense", block_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = resolve_backend(backend)
        if self.backend != "dense" and self.config.softmax_type != "vanilla":
            self.backend = "dense"  # off-by-one / learnable softmax: only megatron's kernel has it
        self.block_size = block_size
        self.kv_cache = None
        """Set by the sampler: an object with ``extend(module, key, value) -> (key, value)``."""
        if self.backend == "flex" and self.config.attention_dropout > 0:
            raise ValueError("model.attention_backend=flex does not implement attention dropout")

    @property
    def scale(self) -> float:
        # DotProductAttention splits the scale between the scores and the softmax when
        # query-key layer scaling is on; the product is the real scale.
        return self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if self.kv_cache is not None:
            key, value = self.kv_cache.extend(self, key, value)
        if self.backend == "dense":
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        assert attention_bias is None and packed_seq_params is None, f"{self.backend} backend: no bias / packed sequences"
        if self.backend == "sdpa":
            return self._sdpa_forward(query, key, value, attention_mask, attn_mask_type or self.attn_mask_type)
        return self._flex_forward(query, key, value, attention_mask)

    def _sdpa_forward(self, query, key, value, attention_mask, mask_type):
        """[sq, b, np, hn] x [sk, b, ng, hn] -> [sq, b, np * hn] with torch SDPA."""
        import torch.nn.functional as F
        from megatron.core.transformer.enums import AttnMaskType

        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        allowed, is_causal = None, False
        if attention_mask is not None:
            allowed = ~attention_mask  # SDPA's boolean mask is True where attention IS allowed
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                is_causal = True
            else:  # queries are the last sq of sk positions (bottom-right aligned causal)
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        p = self.attention_dropout.p if self.training else 0.0
        if p > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, is_causal=is_causal,
                                                     scale=self.scale, enable_gqa=np_ != ng)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, is_causal=is_causal,
                                                 scale=self.scale, enable_gqa=np_ != ng)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _flex_forward(self, query, key, value, attention_mask):
        """[sq, b, np, hn] x [sk, b, ng, hn] -> [sq, b, np * hn] with FlexAttention."""
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        block_mask = _cached_block_mask(attention_mask, sq, sk, self.block_size, query.device)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = flex_attention_fn(query.device)(q, k, v, block_mask=block_mask, scale=self.scale, enable_gqa=np_ != ng)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
