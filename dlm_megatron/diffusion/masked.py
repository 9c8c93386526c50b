"""Masked (absorbing-state) diffusion: forward process and loss, as pure functions.

Follows LLaDA's published training pseudocode (Nie et al. 2025, "Large Language Diffusion
Models", Algorithm 1 / appendix): per sequence a noise level t ~ U(eps, 1); every token is
independently replaced by MASK with probability t; the loss is cross-entropy on the masked
positions only, each weighted by 1/t, summed and divided by the number of tokens B*L.
This is an upper bound on the negative log-likelihood per token (the ELBO of MDLM/SMDM).

Shape legend: B batch, L sequence length, V vocabulary.
Randomness is passed in as uniforms (``u_B``, ``u_BL``) so these functions are pure and
the caller decides how noise is derived (from (seed, step, sample index), never per rank).
"""
from __future__ import annotations

import torch


def t_from_uniform(u_B: torch.Tensor, eps: float) -> torch.Tensor:
    """Map uniforms in [0, 1) to noise levels t in [eps, 1): t = eps + (1 - eps) u.  [B] -> [B]"""
    return eps + (1.0 - eps) * u_B


def stratified_uniform(offset: float, n: int, dtype=torch.float64) -> torch.Tensor:
    """Antithetic / low-discrepancy uniforms: (offset + j/n) mod 1 for j = 0..n-1.

    One random offset per batch makes the n values evenly spaced, which lowers the
    variance of the Monte Carlo estimate over t (as in MDLM's "low-discrepancy sampler").
    Returns [n].
    """
    return torch.remainder(offset + torch.arange(n, dtype=dtype) / n, 1.0)


def mask_tokens(x0_BL: torch.Tensor, t_B: torch.Tensor, u_BL: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process q(x_t | x_0): token i of sequence b is masked iff u_BL[b, i] < t_B[b].

    Returns (xt_BL, is_masked_BL). ``u_BL`` are uniforms in [0, 1).
    """
    is_masked_BL = u_BL < t_B[:, None].to(u_BL.dtype)
    xt_BL = torch.where(is_masked_BL, torch.full_like(x0_BL, mask_id), x0_BL)
    return xt_BL, is_masked_BL


def masked_loss_weights(is_masked_BL: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """Per-token loss weights: 1/t on masked positions, 0 elsewhere.  -> [B, L] float32."""
    return is_masked_BL.to(torch.float32) / t_B[:, None].to(torch.float32)


def weighted_token_loss(token_nll_BL: torch.Tensor, weight_BL: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """sum(nll * weight) / num_tokens (default B * L): LLaDA's normalisation by the number
    of tokens. Objectives whose model input is longer than the clean sequence (block
    diffusion's 2L) pass the clean token count.

    Unmasked tokens have weight 0 and contribute nothing (not even NaN: we use where,
    so a non-finite NLL at an unmasked position cannot leak into the loss).
    """
    contrib = torch.where(weight_BL != 0, token_nll_BL.float() * weight_BL, torch.zeros_like(weight_BL))
    return contrib.sum() / (token_nll_BL.numel() if num_tokens is None else num_tokens)


# ---------------------------------------------------------------------------------------
# LLaDA's lower-variance likelihood estimator (conditional scoring of an answer)
#
# log p(a | c) >= E_{l ~ U{1..L}} E_{S ~ U(l-subsets)} [ (L / l) sum_{i in S} log p(a_i | c, a_{-S}) ]
# with a the L answer tokens and a_{-S} the answer with the positions S masked (Nie et al.
# 2025, Eq. 6). Its expectation is that of the 1/t form E_t[(1/t) sum_{masked} ...]: the
# 1/t form gives each l-subset S the weight int_0^1 (1/t) t^l (1 - t)^(L-l) dt = B(l, L-l+1)
# = 1 / (l C(L, l)); the l-form gives it P(l) P(S | l) (L / l) = (1/L) (1/C(L, l)) (L/l), the
# same. Fixing the count l removes the binomial spread of the number of masked tokens (and
# the 1/t blow-up at small t), hence the lower variance.


def num_masked_from_uniform(u_K: torch.Tensor, L: int) -> torch.Tensor:
    """l = 1 + floor(L u), uniform on {1, ..., L} for u ~ U[0, 1).  [K] -> [K] long"""
    return (1 + torch.floor(u_K.to(torch.float64) * L).long()).clamp(1, L)


def mask_exactly(u_KL: torch.Tensor, l_K: torch.Tensor) -> torch.Tensor:
    """True at the l_k positions of row k with the smallest uniforms: for i.i.d. u, a uniformly
    random subset of exactly l_k positions (every order of the u is equally likely).  -> [K, L] bool"""
    rank_KL = u_KL.argsort(dim=1).argsort(dim=1)  # rank of each position's uniform within its row
    return rank_KL < l_K[:, None]


def exact_count_weights(l_K: torch.Tensor, L: int) -> torch.Tensor:
    """The estimator's weight L / l of a sample with l of L tokens masked.  [K] -> [K] float64"""
    return L / l_K.to(torch.float64)
