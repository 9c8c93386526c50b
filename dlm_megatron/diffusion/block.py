"""Block diffusion (BD3-LM, Arriola et al. 2025): forward process, 2L layout, masks, loss.

The clean sequence x_0 of length L is cut into K = L / block_size blocks. Every block k gets
its own noise level t_k; its tokens are masked independently with probability t_k. The
model then reads one 2L sequence, the noised x_t followed by the clean x_0, under one
attention mask:

    query \\ key        x_t block j            x_0 block j
    x_t block k        j == k  (diagonal)     j <  k  (strictly earlier clean blocks)
    x_0 block k        never                  j <= k  (block-causal)

so one forward pass computes, for every block at once, p(x_0 block k | x_t block k, clean
blocks < k): the same thing a loop over blocks computes with one forward per block
(``per_block_loss`` is that loop, kept as the reference for tests and the benchmark).
RoPE positions are 0..L-1 for both halves, so x_t token i and x_0 token i share a position.
The loss is cross-entropy on the masked x_t tokens weighted by 1/t_k, normalised by the
number of clean tokens B*L: with block_size == L it is the masked-diffusion loss, with
block_size == 1 and t == 1 it is the autoregressive next-token NLL.

Everything here is a pure function of its inputs (randomness comes in as uniforms), so
every TP rank and PP stage that holds a sample builds the identical mask, positions and
noise: nothing about block diffusion is rank-specific.

Shape legend: B batch, L clean length, S = 2L model length, K blocks per sequence
(L / block_size), N length of a clean-prefix-plus-block sequence, V vocabulary.
Masks follow megatron-core: boolean, True = may NOT attend.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch


def num_blocks(seq_len: int, block_size: int) -> int:
    """K = L / block_size; raises ValueError when block_size does not divide L."""
    if block_size < 1 or seq_len % block_size:
        raise ValueError(f"block_size={block_size} must be >= 1 and divide the sequence length {seq_len}")
    return seq_len // block_size


def noise_range(eps: float, t_min: float, t_max: float) -> tuple[float, float]:
    """The interval t is drawn from: BD3-LM's clipped schedule U[t_min, t_max].

    t_min = 0 means eps (the 1/t weight must stay finite)."""
    lo = t_min if t_min > 0 else eps
    if not 0 < lo < t_max <= 1:
        raise ValueError(f"need 0 < t_min (or eps) < t_max <= 1, got [{lo}, {t_max}]")
    return lo, t_max


def eval_noise_range(eps: float) -> tuple[float, float]:
    """The interval t is drawn from when the loss is evaluated as a bound: (eps, 1), whatever
    the training schedule's clipping. The NELBO is an integral over all of t in (0, 1]; a
    clipped [t_min, t_max] averages only part of the integrand and is no bound."""
    return noise_range(eps, 0.0, 1.0)


def t_from_uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """t = lo + (hi - lo) u, any shape. With (lo, hi) = (eps, 1) this is masked diffusion's map."""
    return lo + (hi - lo) * u


def expand_blocks(v_BK: torch.Tensor, block_size: int) -> torch.Tensor:
    """Repeat a per-block value over the block's tokens.  [B, K] -> [B, L]"""
    return v_BK.repeat_interleave(block_size, dim=1)


def mask_blocks(x0_BL: torch.Tensor, t_BK: torch.Tensor, u_BL: torch.Tensor, mask_id: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process: token i of block k is masked iff u_BL[b, i] < t_BK[b, k].

    Returns (xt_BL, is_masked_BL)."""
    is_masked_BL = u_BL < expand_blocks(t_BK, block_size).to(u_BL.dtype)
    return torch.where(is_masked_BL, torch.full_like(x0_BL, mask_id), x0_BL), is_masked_BL


def loss_weights(is_masked_BL: torch.Tensor, t_BK: torch.Tensor, block_size: int) -> torch.Tensor:
    """1/t_k on the masked tokens of block k, 0 elsewhere.  -> [B, L] float32"""
    return is_masked_BL.to(torch.float32) / expand_blocks(t_BK, block_size).to(torch.float32)


# ---------------------------------------------------------------------------------------
# The 2L layout


def allowed_2l(q_idx: torch.Tensor, kv_idx: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """May query q_idx attend key kv_idx in the [x_t ; x_0] layout?  (broadcasting ints/tensors)

    Written with elementwise integer ops only, so it doubles as a FlexAttention mask_mod."""
    q_noisy, kv_noisy = q_idx < seq_len, kv_idx < seq_len
    q_blk, kv_blk = (q_idx % seq_len) // block_size, (kv_idx % seq_len) // block_size
    diagonal = q_noisy & kv_noisy & (q_blk == kv_blk)
    earlier_clean = q_noisy & ~kv_noisy & (kv_blk < q_blk)
    block_causal = ~q_noisy & ~kv_noisy & (kv_blk <= q_blk)
    return diagonal | earlier_clean | block_causal


def attended_tile_fraction(seq_len: int, block_size: int, tile: int = 128) -> float:
    """Fraction of the (2L / tile)^2 attention tiles that hold at least one allowed pair in
    the 2L mask: the share of dense attention work a block-sparse kernel (FlexAttention,
    128 x 128 tiles) executes. Interval arithmetic per row of tiles (no S x S mask), so it is
    cheap at any length.  -> float in (0, 1]"""
    L, B, S = seq_len, block_size, 2 * seq_len
    num_blocks(L, B)
    n = -(-S // tile)

    def key_ranges(q0: int, q1: int) -> list[tuple[int, int]]:
        """Allowed key intervals [a, b) of the queries [q0, q1) (all on one side of L)."""
        if q0 < L:  # x_t queries: their own blocks, and the clean blocks before the latest one
            first, last = q0 // B, (q1 - 1) // B
            return [(first * B, (last + 1) * B), (L, L + last * B)]
        last = (q1 - 1 - L) // B  # x_0 queries: block-causal over x_0
        return [(L, L + (last + 1) * B)]

    hit = 0
    for i in range(n):
        q0, q1 = i * tile, min((i + 1) * tile, S)
        parts = [(q0, min(q1, L)), (max(q0, L), q1)]
        tiles: set[int] = set()
        for a, b in parts:
            if a < b:
                for k0, k1 in key_ranges(a, b):
                    if k0 < k1:
                        tiles.update(range(k0 // tile, -(-k1 // tile)))
        hit += len(tiles)
    return hit / (n * n)


@lru_cache(maxsize=8)
def block_diffusion_mask(seq_len: int, block_size: int) -> torch.Tensor:
    """The 2L attention mask, True = masked out.  -> [1, 1, S, S] bool (cached: treat as read-only)

    It depends only on (L, block_size), never on the data, so one tensor serves every batch."""
    num_blocks(seq_len, block_size)
    idx = torch.arange(2 * seq_len)
    return ~allowed_2l(idx[:, None], idx[None, :], seq_len, block_size)[None, None]


def block_causal_mask(n: int, block_size: int) -> torch.Tensor:
    """Block-causal mask over N tokens (token i sees every token of blocks <= its own).

    True = masked out.  -> [1, 1, N, N] bool. A clean prefix followed by one noised block
    under this mask is exactly what the 2L layout shows one x_t block; N need not be a
    multiple of block_size (the last block may be partial)."""
    blk = torch.arange(n) // block_size
    return (blk[None, :] > blk[:, None])[None, None]


def two_half_positions(batch: int, seq_len: int) -> torch.Tensor:
    """RoPE positions 0..L-1 for x_t and again for x_0.  -> [B, S] long"""
    return torch.arange(seq_len).repeat(2).expand(batch, -1).contiguous()


def two_half_inputs(x0_BL: torch.Tensor, xt_BL: torch.Tensor, w_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens_BS, labels_BS, weights_BS) of the 2L layout.

    Labels of both halves are x_0 (the clean half's labels are never used: weight 0; they
    are valid ids so the vocab-parallel cross-entropy sees no out-of-range target)."""
    tokens_BS = torch.cat([xt_BL, x0_BL], dim=1)
    labels_BS = torch.cat([x0_BL, x0_BL], dim=1)
    weights_BS = torch.cat([w_BL, torch.zeros_like(w_BL)], dim=1)
    return tokens_BS, labels_BS, weights_BS


# ---------------------------------------------------------------------------------------
# Reference: one forward per block (what the 2L layout vectorises)

NllFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(tokens_BN, positions_BN, mask_11NN, labels_BN) -> per-token NLL [B, N]."""


def per_block_loss(nll_fn: NllFn, x0_BL: torch.Tensor, xt_BL: torch.Tensor, w_BL: torch.Tensor, block_size: int) -> torch.Tensor:
    """The block-diffusion loss computed naively: for block k run the model on
    [clean blocks < k ; noised block k] under a block-causal mask and score block k.

    Same value and gradients as the 2L forward (the identity tests check this); K forwards of
    growing length instead of one, so it is the slow reference and the benchmark baseline.
    Returns the scalar loss normalised by B*L."""
    batch, seq_len = x0_BL.shape
    total = x0_BL.new_zeros((), dtype=torch.float32)
    for k in range(num_blocks(seq_len, block_size)):
        lo, hi = k * block_size, (k + 1) * block_size
        w_blk = w_BL[:, lo:hi]
        if not bool((w_blk != 0).any()):
            continue  # nothing masked in this block: contributes exactly 0
        tokens = torch.cat([x0_BL[:, :lo], xt_BL[:, lo:hi]], dim=1)
        positions = torch.arange(hi).expand(batch, -1)
        nll = nll_fn(tokens, positions, block_causal_mask(hi, block_size), x0_BL[:, :hi])[:, lo:hi]
        total = total + torch.where(w_blk != 0, nll.float() * w_blk, torch.zeros_like(w_blk)).sum()
    return total / x0_BL.numel()
