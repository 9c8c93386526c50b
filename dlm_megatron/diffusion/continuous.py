"""Continuous latent diffusion on token embeddings (pure math), CDCD-style.

Dieleman et al. 2022, "Continuous diffusion for categorical data" (CDCD, arXiv:2211.15089);
preconditioning after Karras et al. 2022 (EDM, arXiv:2206.00364); see also Plaid
(Gulrajani & Hashimoto 2023).

Forward process (variance exploding): x = e(x0) + sigma * n, n ~ N(0, I), where e(x0)
are the token embeddings *L2-normalised to norm sqrt(D)* (per-component scale ~1, so
c_in = 1/sqrt(1 + sigma^2) keeps the model input at unit variance). The model sees
c_in(sigma) * x plus a learned embedding of Fourier features of log(sigma)/4, outputs
logits over the vocabulary and is trained with plain cross-entropy against x0 ("score
interpolation"): E[e(x0) | x] = softmax(logits) @ E and the score is
grad_x log p(x) = (E[e(x0)|x] - x) / sigma^2 (Tweedie).

Why the normalisation: embeddings are learned jointly with the denoiser, so
  * they cannot *blow up in scale* to beat the noise (a larger ||e|| would make every
    sigma trivially easy and the schedule meaningless): their norm is fixed at sqrt(D);
  * they cannot *collapse together* to make the loss trivial either: with cross-entropy
    (not an L2 loss on embeddings) collapsed embeddings make tokens indistinguishable and
    raise the loss, so the objective itself pushes embeddings apart — unlike an MSE
    objective on embeddings, where collapse is a trivial minimum (Dieleman et al. Sec. 3.1).

Shape legend: B batch, S sequence, H hidden (embedding) size, V vocabulary.
"""
from __future__ import annotations

import math

import torch


def sigma_from_uniform(u: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Log-uniform noise levels: sigma = sigma_min * (sigma_max / sigma_min) ** u, u in [0, 1).

    Monotone increasing in u; u=0 -> sigma_min, u->1 -> sigma_max."""
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


def sampling_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 0.0) -> torch.Tensor:
    """The sampler's decreasing grid of ``steps + 1`` levels from sigma_max to sigma_min.

    rho = 0: geometric spacing (uniform in log sigma, matching the training distribution);
    rho > 0: Karras et al. spacing (sigma_max^(1/rho) -> sigma_min^(1/rho) linearly), rho=7
    spends more steps at low noise.  -> [steps + 1] float64
    """
    i = torch.arange(steps + 1, dtype=torch.float64) / max(steps, 1)
    if rho <= 0:
        return torch.exp(math.log(sigma_max) + i * (math.log(sigma_min) - math.log(sigma_max)))
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + i * (b - a)) ** rho


def normalise(e_H: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale vectors (last dim D) to L2 norm sqrt(D)."""
    D = e_H.shape[-1]
    return e_H * (math.sqrt(D) / e_H.norm(dim=-1, keepdim=True).clamp_min(eps))


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    """Input scaling 1/sqrt(sigma^2 + 1) (unit-variance components in, unit variance out)."""
    return torch.rsqrt(sigma * sigma + 1.0)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Time conditioning variable ln(sigma)/4 (EDM)."""
    return torch.log(sigma) / 4.0


def fourier_features(c_B: torch.Tensor, num_features: int) -> torch.Tensor:
    """[cos(2 pi f_k c), sin(2 pi f_k c)] with fixed log-spaced frequencies f_k in [1/8, 64].

    Deterministic (no parameters), so every rank and layout computes the same features.  -> [B, F]"""
    half = num_features // 2
    f = torch.exp(torch.linspace(math.log(1 / 8), math.log(64.0), half, dtype=torch.float64))
    ang = 2 * math.pi * c_B.to(torch.float64)[:, None] * f[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def expected_embedding(probs_BSV: torch.Tensor, E_VH: torch.Tensor) -> torch.Tensor:
    """E[e(x0) | x] = softmax(logits) @ E.  -> [B, S, H]"""
    return probs_BSV @ E_VH


def score(x_BSH: torch.Tensor, ex0_BSH: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Score of the noised data, (E[x0] - x) / sigma^2 (``sigma`` scalar or broadcastable)."""
    return (ex0_BSH - x_BSH) / sigma ** 2


def euler_step(x_BSH: torch.Tensor, ex0_BSH: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - E[x0]) / sigma."""
    return x_BSH + (sigma_next - sigma) * (x_BSH - ex0_BSH) / sigma


def mixture_posterior(x_BSH: torch.Tensor, E_VH: torch.Tensor, sigma: float, prior_V: torch.Tensor | None = None) -> torch.Tensor:
    """Exact p(x0 = v | x) when x0 ~ prior over the rows of E and x = e(x0) + sigma n
    (an isotropic Gaussian mixture): softmax_v(log prior_v - ||x - e_v||^2 / (2 sigma^2)).

    Reference for tests: a perfect denoiser outputs these as its probabilities.  -> [B, S, V]"""
    d2 = ((x_BSH[..., None, :] - E_VH) ** 2).sum(-1)
    logp = -d2 / (2 * sigma ** 2)
    if prior_V is not None:
        logp = logp + prior_V.log()
    return torch.softmax(logp, dim=-1)


def noise_for(seeds_B: torch.Tensor, S: int, H: int) -> torch.Tensor:
    """Standard normal noise [B, S, H], row b drawn on CPU from its own seed (rank-independent)."""
    return torch.stack([torch.randn(S, H, generator=torch.Generator().manual_seed(int(s))) for s in seeds_B])
