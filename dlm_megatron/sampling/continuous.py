"""Euler sampler for continuous (CDCD) diffusion language models.

Dieleman et al. 2022, "Continuous diffusion for categorical data": start from
x ~ N(0, sigma_max^2 I) in the (normalised) embedding space, integrate the probability-flow
ODE dx/dsigma = (x - E[x0|x]) / sigma (score = (E[x0|x] - x) / sigma^2) with Euler steps on
a decreasing sigma grid down to sigma_min, then read tokens off with argmax of the logits at
sigma_min. E[x0|x] = softmax(logits / T) @ E (T: the sampler's temperature, 1 = the model's
posterior; < 1 sharpens it, a common CDCD/Plaid knob). Prompt positions are held at the
clean prompt embedding re-noised to the current sigma with fresh noise (replacement /
inpainting conditioning), so an unconditionally trained model can complete a prefix.
All randomness comes from one CPU generator seeded by ``seed``: runs are reproducible.

Shape legend: B batch, P prompt length, S total length, H hidden, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import continuous as cd


@dataclass(kw_only=True)
class ContinuousSamplerConfig:
    steps: int = 64
    """Number of Euler steps N between sigma_max and sigma_min."""
    gen_length: int = 64
    """Tokens to generate after the prompt."""
    sigma_min: float = 1.0
    """Last noise level (default: the training schedule's diffusion.sigma_min)."""
    sigma_max: float = 300.0
    """First noise level (default: diffusion.sigma_max)."""
    rho: float = 0.0
    """Grid spacing: 0 = geometric (uniform in log sigma); > 0 Karras spacing (e.g. 7)."""
    temperature: float = 1.0
    """Softmax temperature of the posterior used for E[x0] (1 = model; 0 is read as 1)."""
    seed: int = 0
    """Seed of the CPU generator for the initial noise and prompt re-noising."""


def _randn(shape, g, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(like.device, like.dtype)


@torch.no_grad()
def generate_continuous(model, prompt_BP: torch.Tensor, vocab_size: int, cfg: ContinuousSamplerConfig,
                        *, return_trajectory: bool = False):
    """Sample ``cfg.gen_length`` tokens after ``prompt_BP`` with a TP=1 continuous denoiser.

    ``model`` is a Denoiser built for diffusion.objective=continuous. -> tokens [B, P + gen_length]
    (and the list of x per step if ``return_trajectory``)."""
    dev = prompt_BP.device
    B, P = prompt_BP.shape
    S = P + cfg.gen_length
    E_VH = model.normalised_embedding_table()[:vocab_size].float()
    H = E_VH.shape[1]
    g = torch.Generator().manual_seed(int(cfg.seed))
    sigmas = cd.sampling_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
    temp = cfg.temperature if cfg.temperature and cfg.temperature > 0 else 1.0
    dummy_BS = torch.zeros(B, S, dtype=torch.long, device=dev)
    e_prompt = E_VH[prompt_BP] if P else None
    x = sigmas[0] * _randn((B, S, H), g, E_VH)
    traj = []

    def denoise(x, sigma):
        if P:
            x = x.clone()
            x[:, :P] = e_prompt + sigma * _randn((B, P, H), g, E_VH)
        sig_B = torch.full((B,), float(sigma), device=dev)
        logits = model(dummy_BS, None, None, sigma_B=sig_B, noisy_x_BSH=x.to(model.config.params_dtype))
        return x, logits[..., :vocab_size].float()

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x, logits = denoise(x, sigma)
        ex0 = cd.expected_embedding(torch.softmax(logits / temp, dim=-1), E_VH)
        x = cd.euler_step(x, ex0, sigma, sigma_next)
        if return_trajectory:
            traj.append(x.clone())
    _, logits = denoise(x, sigmas[-1])
    out = logits.argmax(-1)
    if P:
        out[:, :P] = prompt_BP
    return (out, traj) if return_trajectory else out
