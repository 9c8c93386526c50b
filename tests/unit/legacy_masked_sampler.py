"""FROZEN copy of dlm_megatron/sampling/masked.py as of commit 4335038 (before issue 14).

The reference for "an existing command line gives the same tokens as before": tests compare the
current sampler at its default knobs against this file bit for bit. Do not edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, overload

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "REMASKING_RULES",
    "TEMPERATURE_SCHEDULES",
    "SamplerConfig",
    "confidence",
    "generate",
    "num_transfer_tokens",
    "remask_committed",
    "sample_tokens",
    "select_top",
    "temperature_at",
]

REMASKING_RULES = ("low_confidence", "random", "margin", "entropy")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")

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
    """If set, also commit every masked position whose confidence >= threshold (parallel decoding)."""
    renoise_prob: float = 0.0
    """ReMDM-style: chance that a token committed earlier in the current block is re-masked each step."""
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
        # p_r = 1 would re-mask the whole block every step, so nothing but the
        # final step would ever count.
        if not (0.0 <= self.renoise_prob < 1.0):
            raise ValueError(f"renoise_prob must be in [0, 1), got {self.renoise_prob}")


# --------------------------------------------------------------------------- #
# Schedule helpers (pure, reusable by a block-diffusion sampler)
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
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Masked-diffusion generation.

    logits_fn:  [B, S] long -> [B, S, V] float, the denoiser over the full sequence.
    prompt_ids: [B, P] long; never modified.
    returns:    [B, S] long with no mask left in the generation region; with
                return_history=True also a list whose item 0 is the initial
                sequence and item i the sequence after the i-th executed step.

    Per block with K = steps / num_blocks steps, step i (noise level
    t = 1 - i/K) commits the number of tokens given by the linear acceptance
    profile over the remaining steps, recomputed from the current masked count
    so that renoised tokens are absorbed and the last step always clears the
    block. With confidence_threshold the count is max(profile, #confident, 1),
    and the block ends as soon as it has no masks (fewer forward passes).

    mask_id is always suppressed in addition to `suppress_ids`: sampling it
    would leave a position masked forever.

    eos_id: once a row has an EOS in a finished block, its later blocks are
    filled with eos_id without sampling; generation stops when every row is done.

    progress(step, total) is called after each executed step (step counts
    skipped steps too, so it reaches `total` unless generation stops early).
    """
    cfg.validate()
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")

    batch, prompt_len = prompt_ids.shape
    seq_len = prompt_len + cfg.gen_length
    device = prompt_ids.device
    k = cfg.steps_per_block
    generator = torch.Generator().manual_seed(cfg.seed)
    suppress = sorted({int(mask_id), *(int(i) for i in suppress_ids)})

    x = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids
    history: list[Tensor] = [x.clone()] if return_history else []
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    for b in range(cfg.num_blocks):
        lo = prompt_len + b * cfg.block_length
        hi = lo + cfg.block_length
        # Tokens committed by sampling in this block: the only renoise targets,
        # so the prompt, finished blocks and EOS fill are never disturbed.
        committed = torch.zeros(batch, cfg.block_length, dtype=torch.bool, device=device)

        for i in range(k):
            if cfg.renoise_prob > 0.0:
                remask = remask_committed(committed, cfg.renoise_prob, generator)
                x[:, lo:hi] = x[:, lo:hi].masked_fill(remask, mask_id)
                committed &= ~remask

            masked = x[:, lo:hi] == mask_id  # [B, L]
            if not bool(masked.any()):
                break

            logits = logits_fn(x)
            if logits.dim() != 3 or logits.shape[:2] != (batch, seq_len):
                raise ValueError(
                    f"logits_fn must return [B, S, V] = [{batch}, {seq_len}, V], got {tuple(logits.shape)}"
                )
            # Only the current block can be committed, so work on its slice
            # (cuts noise/softmax cost by S / L). index_fill is out of place:
            # the caller's logits tensor is never mutated.
            block_logits = logits[:, lo:hi].double()
            block_logits = block_logits.index_fill(
                -1, torch.tensor(suppress, device=logits.device), -math.inf
            )

            x0 = sample_tokens(block_logits, temperature_at(1.0 - i / k, cfg), generator)
            # Confidence uses the untempered model belief, as in LLaDA.
            probs = F.softmax(block_logits, dim=-1)
            score = confidence(probs, x0, cfg.remasking, generator)

            masked_d = masked.to(logits.device)
            n = num_transfer_tokens(masked_d.sum(dim=1), k - i)[:, 0]
            if cfg.confidence_threshold is not None:
                n_confident = ((score >= cfg.confidence_threshold) & masked_d).sum(dim=1)
                n = torch.maximum(torch.maximum(n, n_confident), masked_d.any(dim=1).long())
            commit = select_top(score, masked_d, n).to(device)

            x[:, lo:hi] = torch.where(commit, x0.to(device), x[:, lo:hi])
            committed |= commit
            if return_history:
                history.append(x.clone())
            if progress is not None:
                progress(b * k + i + 1, cfg.steps)

        if eos_id is not None:
            done |= (x[:, prompt_len:hi] == eos_id).any(dim=1)
            tail = x[:, hi:]
            x[:, hi:] = torch.where(done[:, None] & (tail == mask_id), eos_id, tail)
            if bool(done.all()):
                break

    return (x, history) if return_history else x
