"""Deterministic noise streams keyed by (seed, purpose, index).

Every random draw of the diffusion objectives comes from a generator seeded by the run
seed, a purpose tag and a *global* index (sample position in the global batch sequence,
or step). Ranks never draw noise independently: a tensor-parallel peer, a pipeline stage
or a different data-parallel layout recomputes exactly the same noise for a sample.
"""
from __future__ import annotations

import numpy as np
import torch

# Purpose tags: distinct streams so e.g. the t of a sample is independent of its mask.
TAG_SAMPLE = 1      # per-sample noise (t and token uniforms)
TAG_STEP = 2        # per-step decisions (random length, antithetic offset)
TAG_EVAL = 3        # validation noise (fixed across runs for comparability)
TAG_PROMPT_DROP = 4  # SFT prompt dropout: one uniform per training sample (diffusion.prompt_dropout)


def generator(seed: int, tag: int, index: int) -> torch.Generator:
    """A CPU torch.Generator for stream (seed, tag, index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, tag, int(index)]).generate_state(2, np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g
