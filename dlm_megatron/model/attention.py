"""Core-attention backends for block diffusion, behind megatron-core's core-attention interface.

``BlockDiffusionAttention`` takes the place of megatron-core's core attention (the
softmax(QK^T)V step that runs after linear_qkv and RoPE, before linear_proj) in the layer
spec of block-diffusion models. It is called exactly like DotProductAttention:
query [sq, b, np, hn], key/value [sk, b, ng, hn], boolean mask [1 or b, 1, sq, sk]
(True = may NOT attend) or None (attend everywhere); it returns [sq, b, np * hn].
``model.attention_backend`` picks the kernel:

- ``dense``: megatron-core's own DotProductAttention with the arbitrary boolean mask. Runs
  everywhere (forward and backward); the reference the other kernel is tested against.
- ``flex``: torch FlexAttention with a BlockMask. Tiles (128 x 128) where no query may see any
  key are skipped, and tiles where every pair is allowed skip the mask lookup: for the 2L
  block-diffusion mask about half the tiles are empty. Compiled (fused kernel) on CUDA; on
  CPU torch only has an eager forward, so CPU runs use it for forward checks only.
- ``auto``: flex on CUDA, dense otherwise.

The mask passed in stays the single source of truth. The flex kernel turns it into a
BlockMask once per forward (all layers receive the same tensor object, so the result is
reused across layers): if it equals the 2L block-diffusion mask of this model's block size,
an analytic mask_mod with a BlockMask cached per (L, block size, device) is used (no dense
lookups inside the kernel, no recompilation between steps); any other mask (the sampler's,
the per-block reference loop's) is looked up from the dense tensor.

KV cache: when ``kv_cache`` is set (by sampling/block.py), the layer's keys/values are
passed through ``kv_cache.extend(self, key, value)``, which prepends the cached keys/values
of earlier tokens (already rotated by RoPE at their own positions) and may append the new
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

BACKENDS = ("auto", "dense", "flex")


def resolve_backend(name: str, cuda: bool | None = None) -> str:
    """'auto' -> 'flex' on CUDA machines, else 'dense'."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    return "flex" if (torch.cuda.is_available() if cuda is None else cuda) else "dense"


def core_attention_builder(backend: str, block_size: int) -> Callable[..., "BlockDiffusionAttention"]:
    """What the layer spec plugs in as ``core_attention`` (megatron calls it with keyword args)."""
    return functools.partial(BlockDiffusionAttention, backend=resolve_backend(backend), block_size=block_size)


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


class BlockDiffusionAttention(DotProductAttention):
    """megatron-core core attention with a dense or FlexAttention kernel and a KV-cache hook."""

    def __init__(self, *args, backend: str = "dense", block_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = resolve_backend(backend)
        self.block_size = block_size
        self.kv_cache = None
        """Set by the sampler: an object with ``extend(module, key, value) -> (key, value)``."""
        if self.backend == "flex":
            if self.config.attention_dropout > 0:
                raise ValueError("model.attention_backend=flex does not implement attention dropout")
            if self.config.softmax_type != "vanilla":
                raise ValueError("model.attention_backend=flex supports only the vanilla softmax")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if self.kv_cache is not None:
            key, value = self.kv_cache.extend(self, key, value)
        if self.backend == "dense":
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        assert attention_bias is None and packed_seq_params is None, "flex backend: no bias / packed sequences"
        return self._flex_forward(query, key, value, attention_mask)

    def _flex_forward(self, query, key, value, attention_mask):
        """[sq, b, np, hn] x [sk, b, ng, hn] -> [sq, b, np * hn] with FlexAttention."""
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        block_mask = _cached_block_mask(attention_mask, sq, sk, self.block_size, query.device)
        # DotProductAttention splits the scale between the scores and the softmax when
        # query-key layer scaling is on; the product is the real scale.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = flex_attention_fn(query.device)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=np_ != ng)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
