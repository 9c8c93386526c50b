"""Ancestral sampler for uniform (UDLM) and hybrid (mask + uniform) discrete diffusion.

Starts the generation region from the prior pi (uniformly random tokens for uniform noise;
MASK with probability 1 - p_u, a random token with probability p_u for hybrid) and runs
``steps`` reverse steps t_n = n/N -> t_{n-1}: at each the denoiser predicts x_theta for every
position and each token is redrawn from the model's reverse kernel
p(z_s | z_t) = q(z_s | z_t, x = x_theta) (diffusion/uniform.py ``posterior_probs``; UDLM,
Schiff et al. 2025, Sec. 3; GIDD, von Rütte et al. 2025). Unlike masked diffusion every token
may still change at every step (uniform noise lets the sampler correct itself). The last step
(s = 0) draws z_0 from x_theta. Prompt tokens are held fixed. All randomness comes from one CPU
torch.Generator seeded with ``seed``: deterministic.

Shape legend: B batch, P prompt length, S sequence (P + gen_length), C clean vocabulary.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..diffusion import uniform as ud


@torch.no_grad()
def generate_uniform(logits_fn: Callable[[Tensor], Tensor], prompt_BP: Tensor, *, mask_id: int, vocab_size: int,
                     gen_length: int, steps: int, p_uniform: float = 1.0, temperature: float = 1.0, seed: int = 0,
                     suppress_ids: tuple[int, ...] = ()) -> Tensor:
    """Generate ``gen_length`` tokens after ``prompt_BP``.  -> [B, P + gen_length] int64

    ``logits_fn``: tokens [B, S] -> logits [B, S, >= vocab_size]. ``temperature`` scales the
    logits of x_theta (0 = argmax x_theta: the reverse kernel is still stochastic).
    ``suppress_ids`` (e.g. PAD) get probability 0 in x_theta.
    """
    if steps < 1 or gen_length < 1:
        raise ValueError(f"steps and gen_length must be >= 1, got {steps}, {gen_length}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    B, P = prompt_BP.shape
    C = vocab_size - 1
    dev = prompt_BP.device
    # Prior draw z_1 ~ pi.
    v = torch.rand(B, gen_length, generator=g, dtype=torch.float64)
    w = torch.rand(B, gen_length, generator=g, dtype=torch.float64)
    rand_ids = ud.clean_to_model_ids(torch.clamp((w * C).long(), max=C - 1), mask_id)
    gen = torch.where(v < p_uniform, rand_ids, torch.full_like(rand_ids, mask_id))
    x = torch.cat([prompt_BP.cpu(), gen], dim=1)
    suppress = [ud.model_to_clean_ids(torch.tensor(i), mask_id).item() for i in suppress_ids if i != mask_id and i < vocab_size]
    for n in range(steps, 0, -1):
        t, s = n / steps, (n - 1) / steps
        logits = logits_fn(x.to(dev)).float().cpu()
        lv = logits[..., :vocab_size]
        lc = torch.cat([lv[..., :mask_id], lv[..., mask_id + 1:]], dim=-1)[:, P:]  # [B, G, C]
        if suppress:
            lc[..., suppress] = float("-inf")
        if temperature > 0:
            x_theta = torch.softmax(lc.double() / temperature, -1)
        else:
            x_theta = torch.zeros_like(lc, dtype=torch.float64).scatter_(-1, lc.argmax(-1, keepdim=True), 1.0)
        if s == 0:
            probs = torch.cat([x_theta, torch.zeros(*x_theta.shape[:-1], 1, dtype=x_theta.dtype)], -1)
        else:
            probs = ud.posterior_probs(x_theta, x[:, P:], t, s, mask_id=mask_id, p_uniform=p_uniform)
        k = torch.multinomial(probs.view(-1, C + 1), 1, generator=g).view(B, gen_length)
        new = torch.where(k == C, torch.full_like(k, mask_id), ud.clean_to_model_ids(k, mask_id))
        x = torch.cat([x[:, :P], new], dim=1)
    return x.to(dev)
