"""LLaDA-style masked-diffusion sampler (model-agnostic, any device).

The sequence starts as ``prompt + [MASK] * gen_length``. The generation region
is cut into blocks that are denoised left to right (semi-autoregressive); each
block gets ``steps / num_blocks`` denoising steps. At every step the denoiser
predicts all positions, a candidate token ``x0`` is drawn per masked position,
and only the most trustworthy candidates (per the remasking rule) are
committed; the rest stay masked for the next step.

The four design knobs of the sampler (docs/objectives.md "Sampling" has the table):

- N, the number of steps (``steps``; K = N / num_blocks per block);
- the temperature schedule T(t) (``temperature``, ``temperature_schedule``);
- the acceptance profile: the fraction F(n/K) of a block's masked positions that is
  committed after step n of K (``acceptance_profile``: linear F(u) = u, cosine
  F(u) = 1 - cos(pi u / 2));
- the renoising (ReMDM remasking) profile: the probability sigma_n that a token
  committed earlier in the block is masked again before step n
  (``renoise_profile`` none | constant | cap | rescale | loop, ``renoise_eta``,
  ``renoise_t_on``/``renoise_t_off``/``renoise_alpha_on`` for loop).

Step n (0-based, noise level t = 1 - n/K, next level s = 1 - (n+1)/K) of a block that
started with M masked positions and has m now (after renoising) commits, with alpha the
committed fraction the profile prescribes (alpha_t = F(1 - t); ReMDM-loop has its own
piecewise alpha): linear, ceil(m / (K - n)) (LLaDA's even split, the schedule's own transfer
ratio (alpha_s - alpha_t) / (1 - alpha_t) = 1 / (K - n) applied to what is masked now);
cosine and loop, m - floor(M (1 - alpha_s)), so that ceil(M alpha_s) positions are committed
after the step. The last step clears the block (commit_count).

Fast-dLLM (Wu et al. 2025): ``parallel_threshold`` commits every masked position
whose confidence is at least the threshold, and at least the most confident one,
ignoring the step schedule (a block takes as many steps as it needs); ``cache``
keeps the keys/values of the whole sequence from a full forward at the start of
each block (prefix: the tokens before the block; dual: also the ones after it)
and runs only the block (and, for prefix, everything after it) in between
(sampling/cache.py).

Classifier-free guidance (``cfg_scale`` W, LLaDA's unsupervised CFG): logits =
u + (1 + W)(c - u), c conditional, u from the same sequence with the prompt masked;
W = 0 skips the unconditional pass.

Shape legend:
    B  batch
    P  prompt length
    S  full sequence length (P + gen_length)
    L  length of the slice being decoded (the current block)
    V  vocabulary size
    K  number of denoising steps
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, overload

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACCEPTANCE_PROFILES",
    "CACHE_MODES",
    "REMASKING_RULES",
    "RENOISE_PROFILES",
    "TEMPERATURE_SCHEDULES",
    "SamplerConfig",
    "acceptance_fraction",
    "alpha_at",
    "commit_count",
    "confidence",
    "denoise_block",
    "denoise_step",
    "generate",
    "guided_logits",
    "num_transfer_tokens",
    "remask_committed",
    "renoise_rate",
    "sample_tokens",
    "select_top",
    "temperature_at",
]

REMASKING_RULES = ("low_confidence", "random", "margin", "entropy")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
ACCEPTANCE_PROFILES = ("linear", "cosine")
RENOISE_PROFILES = ("none", "constant", "cap", "rescale", "loop")
CACHE_MODES = ("none", "prefix", "dual")

LogitsFn = Callable[[Tensor], Tensor]


@dataclass(kw_only=True)
class SamplerConfig:
    steps: int = 64
    """Total denoising steps N over the whole generation (split evenly across blocks)."""
    gen_length: int = 128
    """Number of tokens to generate after the prompt."""
    block_length: int = 32
    """Semi-autoregressive block length; must divide gen_length (== gen_length: one block)."""
    temperature: float = 0.0
    """Sampling temperature for the candidate tokens; 0 = greedy argmax, > 0 = Gumbel-max sampling."""
    temperature_schedule: str = "constant"
    """How temperature evolves with the block's noise level t (1 -> 0): constant | linear | cosine."""
    remasking: str = "low_confidence"
    """Which candidates to commit first: low_confidence | random | margin | entropy."""
    confidence_threshold: float | None = None
    """If set, also commit every masked position whose confidence >= threshold, on top of the
    profile's count, within the block's K steps (the block ends early once it has no masks)."""
    acceptance_profile: str = "linear"
    """Fraction of a block's masked positions committed after step n of K: linear n/K | cosine 1 - cos(pi/2 n/K)."""
    renoise_profile: str = "none"
    """ReMDM remasking of committed tokens: none | constant (eta) | cap (min(eta, (1-alpha_s)/alpha_t))
    | rescale (eta * min(1, (1-alpha_s)/alpha_t)) | loop (eta inside t_off < t <= t_on, alpha held there)."""
    renoise_eta: float = 0.02
    """eta of the renoise profile (constant and loop: the per-step probability; cap: the cap; rescale: the factor)."""
    renoise_t_on: float = 0.55
    """loop: the noise level t at which the remasking loop starts (ReMDM's t_on)."""
    renoise_t_off: float = 0.05
    """loop: the noise level t at which the remasking loop ends (ReMDM's t_off)."""
    renoise_alpha_on: float = 0.9
    """loop: committed fraction reached at t_on and held during the loop (ReMDM's alpha_on)."""
    renoise_prob: float = 0.0
    """Alias: renoise_prob = p > 0 is renoise_profile=constant with renoise_eta=p."""
    cache: str = "none"
    """Fast-dLLM KV cache (masked models, needs a model-backed logits function): none | prefix | dual."""
    parallel_threshold: float | None = None
    """Fast-dLLM parallel decoding: commit every masked position with confidence >= threshold and
    at least the most confident one, regardless of the step schedule (a block runs until it is full)."""
    cfg_scale: float = 0.0
    """Classifier-free guidance W: logits = u + (1 + W)(c - u), u with the prompt masked; 0 = off."""
    stop_at_eos: bool = False
    """A committed EOS also fills the rest of its block with EOS (needs eos_id)."""
    seed: int = 0
    """Seed of the CPU torch.Generator that drives all randomness."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def renoise(self) -> tuple[str, float]:
        """(profile, eta) with the renoise_prob alias resolved."""
        if self.renoise_prob > 0.0:
            return "constant", self.renoise_prob
        return self.renoise_profile, self.renoise_eta

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.gen_length < 1:
            raise ValueError(f"gen_length must be >= 1, got {self.gen_length}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")
        if self.gen_length % self.block_length != 0:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be divisible by block_length ({self.block_length})"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.steps % self.num_blocks != 0:
            raise ValueError(
                f"steps ({self.steps}) must be divisible by the number of blocks "
                f"(gen_length / block_length = {self.num_blocks})"
            )
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite value >= 0, got {self.temperature}")
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(
                f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, "
                f"got {self.temperature_schedule!r}"
            )
        if self.remasking not in REMASKING_RULES:
            raise ValueError(f"remasking must be one of {REMASKING_RULES}, got {self.remasking!r}")
        if self.confidence_threshold is not None and not math.isfinite(self.confidence_threshold):
            raise ValueError(
                f"confidence_threshold must be finite or None, got {self.confidence_threshold}"
            )
        if self.acceptance_profile not in ACCEPTANCE_PROFILES:
            raise ValueError(f"acceptance_profile must be one of {ACCEPTANCE_PROFILES}, got {self.acceptance_profile!r}")
        if self.renoise_profile not in RENOISE_PROFILES:
            raise ValueError(f"renoise_profile must be one of {RENOISE_PROFILES}, got {self.renoise_profile!r}")
        # p_r = 1 would re-mask the whole block every step, so nothing but the
        # final step would ever count.
        if not (0.0 <= self.renoise_prob < 1.0):
            raise ValueError(f"renoise_prob must be in [0, 1), got {self.renoise_prob}")
        if self.renoise_prob > 0.0 and self.renoise_profile != "none":
            raise ValueError(f"renoise_prob is an alias of renoise_profile=constant with renoise_eta=renoise_prob; "
                             f"set one of them, not both (got renoise_profile={self.renoise_profile!r})")
        if not (0.0 <= self.renoise_eta < 1.0) or (self.renoise_profile == "rescale" and self.renoise_eta > 1.0):
            raise ValueError(f"renoise_eta must be in [0, 1), got {self.renoise_eta}")
        if not (0.0 <= self.renoise_t_off < self.renoise_t_on <= 1.0):
            raise ValueError(f"renoise_t_off/renoise_t_on must satisfy 0 <= t_off < t_on <= 1, "
                             f"got {self.renoise_t_off}, {self.renoise_t_on}")
        if not (0.0 < self.renoise_alpha_on < 1.0):
            raise ValueError(f"renoise_alpha_on must be in (0, 1), got {self.renoise_alpha_on}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.parallel_threshold is not None:
            if not (0.0 <= self.parallel_threshold <= 1.0):
                raise ValueError(f"parallel_threshold must be in [0, 1], got {self.parallel_threshold}")
            if self.renoise[0] != "none":
                raise ValueError("parallel_threshold ignores the step schedule, which renoising needs: "
                                 "use renoise_profile=none with parallel_threshold")
            if self.confidence_threshold is not None:
                raise ValueError("set confidence_threshold (within the step schedule) or parallel_threshold "
                                 "(Fast-dLLM, no step schedule), not both")
        if not (self.cfg_scale >= 0.0 and math.isfinite(self.cfg_scale)):
            raise ValueError(f"cfg_scale must be a finite value >= 0, got {self.cfg_scale}")


# --------------------------------------------------------------------------- #
# Schedule helpers (pure, shared with the block-diffusion sampler)
# --------------------------------------------------------------------------- #


def num_transfer_tokens(mask_count: Tensor, steps: int) -> Tensor:
    """Linear acceptance profile: tokens to commit at each of `steps` steps.

    mask_count: [B] long, masked positions still to resolve.
    returns:    [B, steps] long; row b sums to mask_count[b], entries differ by
                at most one, the larger ones first.

    Under the linear noise schedule alpha_t = 1 - t with uniformly spaced
    steps, the expected number of tokens unmasked per step is constant, so the
    count is split as evenly as possible (remainder goes to the early steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mask_count = mask_count.long()
    base = torch.div(mask_count, steps, rounding_mode="floor")
    remainder = mask_count - base * steps
    step_idx = torch.arange(steps, device=mask_count.device)
    return base[:, None] + (step_idx[None, :] < remainder[:, None]).long()


def acceptance_fraction(u: float, profile: str) -> float:
    """F(u): committed fraction of a block's masked positions after a fraction u of its steps."""
    if u >= 1.0:
        return 1.0
    if u <= 0.0:
        return 0.0
    if profile == "linear":
        return u
    if profile == "cosine":
        return 1.0 - math.cos(0.5 * math.pi * u)
    raise ValueError(f"unknown acceptance_profile {profile!r}")


def alpha_at(t: float, cfg: SamplerConfig) -> float:
    """alpha_t, the committed fraction the schedule prescribes at noise level t in [0, 1].

    F(1 - t) for the acceptance profiles; ReMDM-loop: alpha_on * F((1 - t) / (1 - t_on)) above
    t_on, alpha_on on [t_off, t_on], alpha_on + (1 - alpha_on) F((t_off - t) / t_off) below."""
    prof = cfg.acceptance_profile
    if cfg.renoise[0] != "loop":
        return acceptance_fraction(1.0 - t, prof)
    t_on, t_off, a_on = cfg.renoise_t_on, cfg.renoise_t_off, cfg.renoise_alpha_on
    if t >= t_on:
        return a_on * acceptance_fraction((1.0 - t) / (1.0 - t_on), prof) if t_on < 1.0 else 0.0
    if t >= t_off:
        return a_on
    return a_on + (1.0 - a_on) * acceptance_fraction((t_off - t) / t_off, prof)


def _loop_step(i: int, k: int, cfg: SamplerConfig) -> bool:
    """ReMDM-loop's remasking phase: t_off < t <= t_on (never the block's last step)."""
    t = 1.0 - i / k
    return cfg.renoise[0] == "loop" and i < k - 1 and cfg.renoise_t_off < t <= cfg.renoise_t_on


def renoise_rate(i: int, k: int, cfg: SamplerConfig) -> float:
    """sigma for step i of k: the probability that each committed token is masked again first.

    With alpha_t = alpha_at(1 - i/k), alpha_s = alpha_at(1 - (i+1)/k) and
    sigma_max = min(1, (1 - alpha_s) / alpha_t) (ReMDM's bound; 1 when alpha_t = 0):
    constant eta; cap min(eta, sigma_max); rescale eta * sigma_max; loop eta in the loop
    phase (t_off < t <= t_on), else 0; none 0."""
    profile, eta = cfg.renoise
    if profile == "none" or eta <= 0.0:
        return 0.0
    if profile == "constant":
        return eta
    if profile == "loop":
        return eta if _loop_step(i, k, cfg) else 0.0
    a_t, a_s = alpha_at(1.0 - i / k, cfg), alpha_at(1.0 - (i + 1) / k, cfg)
    sigma_max = min(1.0, (1.0 - a_s) / a_t) if a_t > 0.0 else 1.0
    if profile == "cap":
        return min(eta, sigma_max)
    if profile == "rescale":
        return eta * sigma_max
    raise ValueError(f"unknown renoise_profile {profile!r}")


def commit_count(masked_count: Tensor, i: int, k: int, cfg: SamplerConfig, block_total: Tensor | None = None) -> Tensor:
    """Positions to commit at step i of k (before thresholds): [B] long.

    masked_count [B]: masked positions of the block now (after this step's renoising);
    block_total [B]: positions the block had to decode when it started (M).

    linear profile (without ReMDM-loop): LLaDA's even split of what is still masked,
    ceil(m / (k - i)) (its transfer ratio (alpha_s - alpha_t) / (1 - alpha_t) = 1 / (k - i)),
    so renoised tokens are re-committed over the remaining steps.
    Otherwise (cosine, loop): after the step the block holds floor(M (1 - alpha_s)) masks,
    i.e. ceil(M alpha_s) committed positions, and the step commits what is missing (renoised
    tokens included: ReMDM keeps the marginal alpha_s; in loop's phase alpha is held, so each
    step re-commits as many as it re-masked). The last step commits everything."""
    m = masked_count.long()
    if i >= k - 1:
        return m
    if cfg.acceptance_profile == "linear" and cfg.renoise[0] != "loop":
        return num_transfer_tokens(m, k - i)[:, 0]
    total = m if block_total is None else block_total.long().to(m.device)
    a_s = alpha_at(1.0 - (i + 1) / k, cfg)
    keep = torch.floor(total.double() * (1.0 - a_s) + 1e-9).long()
    return torch.clamp(m - keep, min=0)


def temperature_at(t: float, cfg: SamplerConfig) -> float:
    """Temperature at noise level t in [0, 1] (1 = fully masked, 0 = clean).

    linear: T * t; cosine: T * (1 - cos(pi t)) / 2. Both start at T and decay
    to 0, so early (uncertain) steps explore and late steps become greedy.
    """
    if cfg.temperature_schedule == "constant":
        return cfg.temperature
    if cfg.temperature_schedule == "linear":
        return cfg.temperature * t
    if cfg.temperature_schedule == "cosine":
        return cfg.temperature * 0.5 * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"unknown temperature_schedule {cfg.temperature_schedule!r}")


def _uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0,1) float64 drawn on the CPU generator (device-independent stream), moved to `device`."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64).to(device)


def sample_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Candidate tokens x0 = argmax(logits / T + Gumbel).

    logits: [B, L, V]; returns [B, L] long. T <= 0 gives plain argmax. Noise is
    float64 because low-precision Gumbel noise visibly hurts masked-diffusion
    sample quality (ties and truncated tails).
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    u = _uniform(logits.shape, generator, logits.device)
    # Clamp so u == 0 cannot produce log(0); -log(-log u) is then finite.
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def confidence(
    probs: Tensor,
    x0: Tensor,
    rule: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Score each candidate; higher = commit earlier.

    probs: [B, L, V] softmax of the (suppressed, untempered) logits.
    x0:    [B, L] long candidate tokens.
    returns [B, L] in probs' dtype/device:
      low_confidence: p(x0);  margin: p_top1 - p_top2;
      entropy: sum p log p (negative entropy);  random: U[0, 1).
    """
    if rule == "low_confidence":
        return probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    if rule == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if rule == "entropy":
        # xlogy makes 0 * log 0 = 0 for suppressed (zero-probability) tokens.
        return torch.special.xlogy(probs, probs).sum(dim=-1)
    if rule == "random":
        return _uniform(x0.shape, generator, probs.device).to(probs.dtype)
    raise ValueError(f"unknown remasking rule {rule!r}")


def select_top(scores: Tensor, candidates: Tensor, n: Tensor) -> Tensor:
    """The n[b] highest-scoring candidate positions of each row.

    scores: [B, L] float; candidates: [B, L] bool; n: [B] long.
    returns [B, L] bool, True only at candidates. Ties go to the leftmost
    position (stable sort), which keeps greedy decoding deterministic.
    """
    scores = scores.masked_fill(~candidates, -math.inf)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (ranks < n[:, None]) & candidates


def remask_committed(committed: Tensor, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """ReMDM-style renoising: which committed positions to mask again.

    committed: [B, L] bool; returns [B, L] bool subset of committed, each
    chosen independently with probability `prob`.
    """
    if prob <= 0.0 or not bool(committed.any()):
        return torch.zeros_like(committed)
    return committed & (_uniform(committed.shape, generator, committed.device) < prob)


def guided_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + (1 + scale) * (cond - uncond)."""
    return uncond + (1.0 + scale) * (cond - uncond)


def denoise_step(logits_BLV: Tensor, masked_BL: Tensor, i: int, k: int, cfg: SamplerConfig, suppress: Sequence[int],
                 generator: torch.Generator, *, block_total_B: Tensor | None = None,
                 t: float | None = None) -> tuple[Tensor, Tensor]:
    """One step on a block: (candidate tokens [B, L], which to commit [B, L] bool).

    Candidates are drawn at temperature T(t) (t = 1 - i/k unless given), ranked by the
    remasking rule on the untempered probabilities (LLaDA); as many are committed as the
    acceptance profile asks (commit_count), at least every position above
    confidence_threshold (and one). With parallel_threshold the count is Fast-dLLM's:
    every position whose score reaches the threshold, at least the best one."""
    logits = logits_BLV.double().index_fill(-1, torch.tensor(list(suppress), device=logits_BLV.device), -math.inf)
    x0 = sample_tokens(logits, temperature_at(1.0 - i / k if t is None else t, cfg), generator)
    # Confidence uses the untempered model belief, as in LLaDA.
    score = confidence(F.softmax(logits, dim=-1), x0, cfg.remasking, generator)
    masked = masked_BL.to(logits.device)
    if cfg.parallel_threshold is not None:
        n_confident = ((score >= cfg.parallel_threshold) & masked).sum(dim=1)
        n = torch.maximum(n_confident, masked.any(dim=1).long())
    else:
        n = commit_count(masked.sum(dim=1), i, k, cfg, block_total_B)
        if cfg.confidence_threshold is not None:
            n_confident = ((score >= cfg.confidence_threshold) & masked).sum(dim=1)
            n = torch.maximum(torch.maximum(n, n_confident), masked.any(dim=1).long())
    return x0, select_top(score, masked, n)


def fill_after_eos(block_BL: Tensor, eos_id: int) -> Tensor:
    """--stop-at-eos: every position of the block after its first EOS becomes EOS.  -> [B, L] bool (filled)"""
    is_eos = block_BL == eos_id
    return (is_eos.long().cumsum(dim=1) > 0) & ~is_eos


def denoise_block(
    x: Tensor,
    lo: int,
    hi: int,
    block_logits: Callable[[int, Tensor], Tensor],
    cfg: SamplerConfig,
    mask_id: int,
    suppress: Sequence[int],
    generator: torch.Generator,
    *,
    eos_id: int | None = None,
    gen_from: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Decode the block x[:, lo:hi] in place (x: [B, S] long), the step loop both samplers share.

    Step i renoises this block's sampled tokens (renoise_rate), reads block_logits(i,
    masked [B, L]) -> [B, L, V] and commits denoise_step's choice; it ends when the block
    has no masks. Only tokens committed here are renoise targets, so the prompt, finished
    blocks and EOS fill are never disturbed. cfg.stop_at_eos: a committed EOS at a position
    >= gen_from (a prompt token equal to EOS does not count) fills the rest of the block.
    on_step(i) runs after each executed step."""
    batch, k = x.shape[0], cfg.steps_per_block
    committed = torch.zeros(batch, hi - lo, dtype=torch.bool, device=x.device)
    total = (x[:, lo:hi] == mask_id).sum(dim=1)  # M: positions this block decodes
    gen = torch.arange(lo, hi, device=x.device)[None, :] >= gen_from  # [1, L]
    for i in range(block_steps(cfg, hi - lo)):
        sigma = renoise_rate(i, k, cfg) if cfg.parallel_threshold is None else 0.0
        if sigma > 0.0:
            remask = remask_committed(committed, sigma, generator)
            x[:, lo:hi] = x[:, lo:hi].masked_fill(remask, mask_id)
            committed &= ~remask
        masked = x[:, lo:hi] == mask_id  # [B, L]
        if not bool(masked.any()):
            break
        logits = block_logits(i, masked)
        t = None
        if cfg.parallel_threshold is not None:  # noise level = the block's masked fraction
            t = float(masked.sum(dim=1).max()) / (hi - lo)
        x0, commit = denoise_step(logits, masked, i, k, cfg, suppress, generator, block_total_B=total, t=t)
        commit = commit.to(x.device)
        x[:, lo:hi] = torch.where(commit, x0.to(x.device), x[:, lo:hi])
        committed |= commit
        if cfg.stop_at_eos:
            blk = x[:, lo:hi]
            fill = fill_after_eos(blk.masked_fill(~gen & (blk == eos_id), -1), eos_id) & gen
            x[:, lo:hi] = blk.masked_fill(fill, eos_id)
            committed &= ~fill
        if on_step is not None:
            on_step(i)


def block_steps(cfg: SamplerConfig, block_len: int) -> int:
    """Upper bound of the steps a block may take: K, or its length with parallel_threshold
    (at least one position is committed per step)."""
    return max(cfg.steps_per_block, block_len) if cfg.parallel_threshold is not None else cfg.steps_per_block


# --------------------------------------------------------------------------- #
# Model-backed logits functions (what the cache needs)
# --------------------------------------------------------------------------- #


def model_logits_fn(model: torch.nn.Module, vocab_size: int, shift: bool = False) -> LogitsFn:
    """A (TP=1) denoiser as tokens [B, S] -> logits [B, S, V] float32 for the samplers.

    Padded vocabulary rows are cut off so the sampler never proposes a non-token;
    ``shift``: the model was trained with diffusion.shift_logits (token i read from output
    i-1). The function carries ``model``, ``vocab_size`` and ``shift`` so that
    ``cache=prefix|dual`` can run the same model on parts of the sequence."""

    @torch.no_grad()
    def fn(tokens_BS: Tensor) -> Tensor:
        logits = model(tokens_BS, None, None)
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits[..., :vocab_size].float()

    fn.model, fn.vocab_size, fn.shift = model, vocab_size, shift
    return fn


# --------------------------------------------------------------------------- #
# Sampler
# --------------------------------------------------------------------------- #


@overload
def generate(
    logits_fn: LogitsFn,
    prompt_ids: Tensor,
    mask_id: int,
    cfg: SamplerConfig,
    *,
    eos_id: int | None = ...,
    suppress_ids: Sequence[int] = ...,
    progress: Callable[[int, int], None] | None = ...,
    return_history: Literal[False] = ...,
    on_refresh: Callable | None = ...,
) -> Tensor: ...


@overload
def generate(
    logits_fn: LogitsFn,
    prompt_ids: Tensor,
    mask_id: int,
    cfg: SamplerConfig,
    *,
    eos_id: int | None = ...,
    suppress_ids: Sequence[int] = ...,
    progress: Callable[[int, int], None] | None = ...,
    return_history: Literal[True],
    on_refresh: Callable | None = ...,
) -> tuple[Tensor, list[Tensor]]: ...


@torch.no_grad()
def generate(
    logits_fn: LogitsFn,
    prompt_ids: Tensor,
    mask_id: int,
    cfg: SamplerConfig,
    *,
    eos_id: int | None = None,
    suppress_ids: Sequence[int] = (),
    progress: Callable[[int, int], None] | None = None,
    return_history: bool = False,
    on_refresh: Callable | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Masked-diffusion generation.

    logits_fn:  [B, S] long -> [B, S, V] float, the denoiser over the full sequence
                (``model_logits_fn`` for a real model; cache=prefix|dual needs one).
    prompt_ids: [B, P] long; never modified.
    returns:    [B, S] long with no mask left in the generation region; with
                return_history=True also a list whose item 0 is the initial
                sequence and item i the sequence after the i-th executed step.

    Per block with K = steps / num_blocks steps, step i (noise level t = 1 - i/K) first
    renoises (renoise_rate), then commits commit_count positions, recomputed from the
    current masked count so that renoised tokens are absorbed and the last step always
    clears the block. With confidence_threshold the count is max(profile, #confident, 1);
    with parallel_threshold it is max(#confident, 1) and the block runs until it is full.
    A block ends as soon as it has no masks (fewer forward passes).

    mask_id is always suppressed in addition to `suppress_ids`: sampling it
    would leave a position masked forever.

    eos_id: once a row has an EOS in a finished block, its later blocks are
    filled with eos_id without sampling; generation stops when every row is done.
    cfg.stop_at_eos: a committed EOS also fills the rest of its own block.

    progress(step, total) is called after each executed step (step counts
    skipped steps too, so it reaches `total` unless generation stops early).
    on_refresh(runner, x, lo, hi) is called after each cache refresh (tests).
    """
    cfg.validate()
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
    if cfg.stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos needs eos_id")

    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    k = cfg.steps_per_block
    generator = torch.Generator().manual_seed(cfg.seed)
    suppress = sorted({int(mask_id), *(int(i) for i in suppress_ids)})
    step_logits = _StepLogits(logits_fn, cfg, mask_id, prompt_len, on_refresh)

    x = torch.full((batch, prompt_len + cfg.gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids
    history: list[Tensor] = [x.clone()] if return_history else []
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    for b in range(cfg.num_blocks):
        lo = prompt_len + b * cfg.block_length
        hi = lo + cfg.block_length

        def on_step(i: int) -> None:
            if return_history:
                history.append(x.clone())
            if progress is not None:
                progress(min(b * k + i + 1, (b + 1) * k), cfg.steps)

        denoise_block(x, lo, hi, lambda i, masked: step_logits(x, lo, hi, i, masked), cfg, mask_id, suppress,
                      generator, eos_id=eos_id, gen_from=prompt_len, on_step=on_step)
        if eos_id is not None:
            done |= (x[:, prompt_len:hi] == eos_id).any(dim=1)
            tail = x[:, hi:]
            x[:, hi:] = torch.where(done[:, None] & (tail == mask_id), eos_id, tail)
            if bool(done.all()):
                break

    return (x, history) if return_history else x


class _StepLogits:
    """Where a step's block logits come from: the full forward (cache=none), or Fast-dLLM's
    cache (a refresh at a block's first step, cached block forwards after it); with
    guidance each forward also runs the prompt-masked row and the two are combined.
    __call__(x [B, S], lo, hi, i, masked [B, L]) -> [B, L, V] float."""

    def __init__(self, logits_fn: LogitsFn, cfg: SamplerConfig, mask_id: int, prompt_len: int,
                 on_refresh: Callable | None):
        self.logits_fn, self.cfg, self.mask_id, self.prompt_len = logits_fn, cfg, mask_id, prompt_len
        self.on_refresh = on_refresh
        self.runner = None
        if cfg.cache != "none":
            from .cache import FastDLLMCache

            if getattr(logits_fn, "model", None) is None:
                raise ValueError(f"cache={cfg.cache} needs the model: pass a logits function made by model_logits_fn")
            self.runner = FastDLLMCache(logits_fn.model, logits_fn.vocab_size, cfg.cache, shift=logits_fn.shift)
        # A shifted model never sees token 0 masked (it cannot predict it; training keeps it
        # clean even when prompt_dropout drops the prompt), so its unconditional row keeps it.
        self.uncond_from = 1 if getattr(logits_fn, "shift", False) else 0

    def rows(self, x: Tensor) -> Tensor:
        """The model's input rows: x, and with guidance also x with the prompt masked."""
        if self.cfg.cfg_scale <= 0.0:
            return x
        prompt = torch.arange(self.uncond_from, self.prompt_len, device=x.device)
        return torch.cat([x, x.index_fill(1, prompt, self.mask_id)])

    def combine(self, logits: Tensor, batch: int) -> Tensor:
        return guided_logits(logits[:batch], logits[batch:], self.cfg.cfg_scale) if self.cfg.cfg_scale > 0.0 else logits

    def __call__(self, x: Tensor, lo: int, hi: int, i: int, masked: Tensor) -> Tensor:
        inp, batch = self.rows(x), x.shape[0]
        if self.runner is None:
            logits = self.logits_fn(inp)
            if logits.dim() != 3 or logits.shape[:2] != inp.shape:
                raise ValueError(
                    f"logits_fn must return [B, S, V] = [{inp.shape[0]}, {inp.shape[1]}, V], got {tuple(logits.shape)}"
                )
            # Only the current block can be committed, so work on its slice
            # (cuts noise/softmax cost by S / L).
            return self.combine(logits[:, lo:hi], batch)
        if i > 0:
            return self.combine(self.runner.block_logits(inp, lo, hi, masked.any(dim=0)), batch)
        # Fast-dLLM: a full forward at the start of each block refreshes the cache and gives
        # this step's logits. Only masked positions' logits are ever read (denoise_step
        # commits masked positions only), so only those positions go through the output
        # layer (their logits are bit-identical; the rest are 0).
        block_logits = self.combine(self.runner.refresh(inp, lo, hi, masked.any(dim=0)), batch)
        if self.on_refresh is not None:
            self.on_refresh(self.runner, inp, lo, hi)
        return block_logits
