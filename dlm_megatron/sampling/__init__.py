"""Samplers for diffusion language models."""

from __future__ import annotations

from dlm_megatron.sampling.block import generate_blocks
from dlm_megatron.sampling.masked import (
    ACCEPTANCE_PROFILES,
    CACHE_MODES,
    REMASKING_RULES,
    RENOISE_PROFILES,
    TEMPERATURE_SCHEDULES,
    SamplerConfig,
    acceptance_fraction,
    alpha_at,
    commit_count,
    confidence,
    denoise_step,
    generate,
    guided_logits,
    model_logits_fn,
    num_transfer_tokens,
    remask_committed,
    renoise_rate,
    sample_tokens,
    select_top,
    temperature_at,
)

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
    "denoise_step",
    "generate",
    "generate_blocks",
    "guided_logits",
    "model_logits_fn",
    "num_transfer_tokens",
    "remask_committed",
    "renoise_rate",
    "sample_tokens",
    "select_top",
    "temperature_at",
]
