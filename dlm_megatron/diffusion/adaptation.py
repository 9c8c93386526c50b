"""AR -> diffusion adaptation: attention-mask annealing and shifted labels (pure functions).

DiffuLLaMA (Gong et al. 2025, "Scaling Diffusion Language Models via Adaptation from
Autoregressive Models", arXiv:2410.17891) turns a causal LM into a masked diffusion LM by
(1) annealing the attention mask from causal to full over the first ``anneal_steps``
steps: at annealing ratio r every query i attends to all keys j <= i plus each future key
j > i independently with probability r (their ``get_anneal_attn_mask``: causal OR
Bernoulli(r)); and (2) shifting the logits by one, so the output at position i-1 predicts
token i exactly as the AR model's next-token head did. Dream 7B (Ye et al. 2025) keeps
the same shift. With r = 0 and the shift, the adapted model starts *identical* to the AR
model on every position whose prefix is clean.

Here the random future keys are drawn once per optimizer step from a generator keyed by
(seed, TAG_ANNEAL, step) and shared by every sample, micro-batch and rank of that step
(same noise on TP peers, PP stages and any DP size). Masks are boolean [1, 1, L, L] with
True = may NOT attend (megatron-core's AttnMaskType.arbitrary convention).

Shape legend: B batch, L sequence length.
"""
from __future__ import annotations

import torch

from .noise import generator

TAG_ANNEAL = 11  # purpose tag of the annealing stream (distinct from noise.py's tags)


def anneal_fraction(step: int, anneal_steps: int) -> float:
    """Fraction r in [0, 1] of future keys unmasked at optimizer step ``step`` (1 when off)."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / anneal_steps))


def causal_mask(L: int) -> torch.Tensor:
    """[L, L] bool, True above the diagonal (future keys masked)."""
    return torch.ones(L, L, dtype=torch.bool).triu(1)


def annealed_mask(L: int, frac: float, seed: int, step: int) -> torch.Tensor:
    """DiffuLLaMA's annealed attention mask at ratio ``frac``.  -> [1, 1, L, L] bool, True = masked.

    Query i always sees keys j <= i; each key j > i is additionally visible iff
    u_ij < frac with u ~ U[0, 1) drawn from stream (seed, TAG_ANNEAL, step). frac = 0 gives
    the causal mask, frac >= 1 full attention (all False).
    """
    if frac >= 1.0:
        return torch.zeros(1, 1, L, L, dtype=torch.bool)
    fut = causal_mask(L)
    if frac <= 0.0:
        return fut[None, None]
    u = torch.rand(L, L, generator=generator(seed, TAG_ANNEAL, step), dtype=torch.float64)
    return (fut & (u >= frac))[None, None]


def shift_targets(labels_BL: torch.Tensor, weights_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted-logits targets: output position i-1 is trained to predict token i.

    Returns (labels, weights) indexed by *output* position: labels'[i] = labels[i+1],
    weights'[i] = weights[i+1], and the last position gets weight 0 (it has no successor).
    Token 0 has no predecessor; callers keep it clean (never masked), see ``keep_first``.
    """
    lab = torch.roll(labels_BL, -1, dims=1)
    w = torch.roll(weights_BL, -1, dims=1).clone()
    w[:, -1] = 0
    return lab, w


def keep_first(xt_BL: torch.Tensor, x0_BL: torch.Tensor, w_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-mask token 0 (shifted logits cannot predict it): input clean, loss weight 0."""
    xt = xt_BL.clone()
    xt[:, 0] = x0_BL[:, 0]
    w = w_BL.clone()
    w[:, 0] = 0
    return xt, w


def shift_logits(logits_BSV: torch.Tensor) -> torch.Tensor:
    """Sampler side: logits indexed by the token they predict (token i from output i-1).

    Position 0 (never generated: it is the prompt's first token) repeats output 0."""
    return torch.cat([logits_BSV[:, :1], logits_BSV[:, :-1]], dim=1)
