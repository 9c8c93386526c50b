"""Samplers for diffusion language models."""

from __future__ import annotations

from dlm_megatron.sampling.block import generate_blocks
from dlm_megatron.sampling.masked import (
    REMASKING_RULES,
    TEMPERATURE_SCHEDULES,
    SamplerConfig,
    confidence,
    generate,
    num_transfer_tokens,
    remask_committed,
    sample_tokens,
    select_top,
    temperature_at,
)

__all__ = [
    "REMASKING_RULES",
    "TEMPERATURE_SCHEDULES",
    "SamplerConfig",
    "confidence",
    "generate",
    "generate_blocks",
    "num_transfer_tokens",
    "remask_committed",
    "sample_tokens",
    "select_top",
    "temperature_at",
]
