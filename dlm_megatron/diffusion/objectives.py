"""Objectives: turn clean token windows into model inputs, targets and loss weights.

An objective is a small class registered by name (``diffusion.objective``). Its
``make_batch`` is deterministic in (seed, step, global sample positions), so any rank that
holds a sample builds the identical noised batch — the invariant that makes results
independent of the parallel layout (TP peers, PP stages, DP sizes).

Shape legend: B batch, L clean length, S model sequence length (L, or 2L for block diffusion).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import block as bd
from . import masked as md
from .noise import TAG_EVAL, TAG_SAMPLE, TAG_STEP, generator


@dataclass
class Batch:
    """One micro-batch ready for the model (all CPU tensors; the trainer moves them)."""

    tokens_BS: torch.Tensor
    """Model input ids."""
    labels_BS: torch.Tensor
    """Target ids per input position (ignored where loss_weight is 0)."""
    loss_weight_BS: torch.Tensor
    """Per-position loss weights (e.g. 1/t on masked tokens, 0 elsewhere)."""
    t_B: torch.Tensor
    """Noise level per sequence (1.0 where not applicable)."""
    position_ids_BS: torch.Tensor | None = None
    """Explicit RoPE positions (None = 0..S-1)."""
    attention_mask: torch.Tensor | None = None
    """Boolean [1 or B, 1, S, S], True = may NOT attend; None = objective's mask type."""

    num_clean_tokens: int | None = None
    """Normaliser of the loss (clean tokens B*L); None means labels_BS.numel()."""

    @property
    def num_tokens(self) -> int:
        """Normaliser of the loss: number of clean tokens B*L."""
        return int(self.num_clean_tokens if self.num_clean_tokens is not None else self.labels_BS.numel())


def step_random_length(seed: int, step: int, seq_len: int, prob: float, stream: int = TAG_STEP) -> int:
    """LLaDA's random-length trick: with probability ``prob`` the whole step's batch is cut
    to a length drawn uniformly from [1, seq_len] (so the model sees short sequences).
    Decided per optimizer step (not per rank) so all micro-batches and ranks agree."""
    if prob <= 0:
        return seq_len
    g = generator(seed, stream, step)
    if torch.rand((), generator=g).item() < prob:
        return int(torch.randint(1, seq_len + 1, (), generator=g).item())
    return seq_len


class Objective:
    name = "base"
    causal = False

    def __init__(self, dcfg, mask_id: int, seed: int):
        self.dcfg, self.mask_id, self.seed = dcfg, mask_id, seed

    def make_batch(self, x0_BL: torch.Tensor, positions_B: torch.Tensor, *, step: int, global_batch_size: int, eval: bool = False) -> Batch:
        raise NotImplementedError


class MaskedDiffusion(Objective):
    """LLaDA/MDLM absorbing-state diffusion (see diffusion/masked.py)."""

    name = "masked"

    def sample_t(self, positions_B: torch.Tensor, *, step: int, global_batch_size: int, stream: int) -> torch.Tensor:
        eps = self.dcfg.eps
        if self.dcfg.antithetic:
            # One offset per global batch; sample j of the batch gets stratum j.
            off = torch.rand((), generator=generator(self.seed, stream + 100, step), dtype=torch.float64).item()
            j = positions_B - step * global_batch_size
            u = torch.remainder(off + j.to(torch.float64) / global_batch_size, 1.0)
        else:
            u = torch.stack([torch.rand((), generator=generator(self.seed, stream, int(p)), dtype=torch.float64) for p in positions_B])
        return md.t_from_uniform(u, eps)

    def token_uniforms(self, positions_B: torch.Tensor, L: int, stream: int) -> torch.Tensor:
        # Separate index space from sample_t's draw: the token uniforms come second in the stream.
        rows = []
        for p in positions_B:
            g = generator(self.seed, stream, int(p))
            torch.rand((), generator=g, dtype=torch.float64)  # skip the t draw
            rows.append(torch.rand(L, generator=g, dtype=torch.float64))
        return torch.stack(rows)

    def make_batch(self, x0_BL, positions_B, *, step, global_batch_size, eval=False):
        stream = TAG_EVAL if eval else TAG_SAMPLE
        L = x0_BL.shape[1]
        if not eval:
            L = step_random_length(self.seed, step, L, self.dcfg.random_length_prob)
            x0_BL = x0_BL[:, :L]
        t_B = self.sample_t(positions_B, step=step, global_batch_size=global_batch_size, stream=stream)
        u_BL = self.token_uniforms(positions_B, x0_BL.shape[1], stream)
        xt_BL, is_masked_BL = md.mask_tokens(x0_BL, t_B, u_BL, self.mask_id)
        w_BL = md.masked_loss_weights(is_masked_BL, t_B)
        return Batch(tokens_BS=xt_BL, labels_BS=x0_BL, loss_weight_BS=w_BL, t_B=t_B.float())


class Autoregressive(Objective):
    """Next-token prediction with a causal mask: the baseline every DLM is compared with."""

    name = "ar"
    causal = True

    def make_batch(self, x0_BL, positions_B, *, step, global_batch_size, eval=False):
        labels = torch.roll(x0_BL, -1, dims=1)
        w = torch.ones(x0_BL.shape, dtype=torch.float32)
        w[:, -1] = 0.0  # the last position has no next token in this window
        return Batch(tokens_BS=x0_BL, labels_BS=labels, loss_weight_BS=w, t_B=torch.ones(x0_BL.shape[0]))


class BlockDiffusion(Objective):
    """BD3-LM block diffusion: one t per block, input [x_t ; x_0] (2L tokens) under the
    block mask, positions 0..L-1 twice (see diffusion/block.py).

    Noise is keyed like MaskedDiffusion's: per sample (seed, stream, global position) the
    K block levels are drawn first, then the L token uniforms; with antithetic sampling
    block column k of the global batch gets stratified levels (offset_k + j/G) mod 1. With
    block_size == L and the default (eps, 1) range this is bit-for-bit MaskedDiffusion's
    noise. The mask and positions are functions of (L, block_size) only, so every TP rank
    and PP stage builds the same batch. ``diffusion.random_length_prob`` is not used: block
    diffusion already trains on every prefix length.
    """

    name = "block"

    def sample_t(self, positions_B: torch.Tensor, *, step: int, global_batch_size: int, stream: int, K: int) -> torch.Tensor:
        """Block noise levels.  -> [B, K] float64"""
        d = self.dcfg
        lo, hi = bd.noise_range(d.eps, d.t_min, d.t_max)
        if d.antithetic:
            off_K = torch.rand(K, generator=generator(self.seed, stream + 100, step), dtype=torch.float64)
            j_B = (positions_B - step * global_batch_size).to(torch.float64)
            u_BK = torch.remainder(off_K[None, :] + j_B[:, None] / global_batch_size, 1.0)
        else:
            u_BK = torch.stack([torch.rand(K, generator=generator(self.seed, stream, int(p)), dtype=torch.float64) for p in positions_B])
        return bd.t_from_uniform(u_BK, lo, hi)

    def token_uniforms(self, positions_B: torch.Tensor, L: int, K: int, stream: int) -> torch.Tensor:
        rows = []
        for p in positions_B:
            g = generator(self.seed, stream, int(p))
            torch.rand(K, generator=g, dtype=torch.float64)  # skip the block levels
            rows.append(torch.rand(L, generator=g, dtype=torch.float64))
        return torch.stack(rows)

    def make_batch(self, x0_BL, positions_B, *, step, global_batch_size, eval=False):
        stream = TAG_EVAL if eval else TAG_SAMPLE
        batch, L = x0_BL.shape
        bs = self.dcfg.block_size
        K = bd.num_blocks(L, bs)
        t_BK = self.sample_t(positions_B, step=step, global_batch_size=global_batch_size, stream=stream, K=K)
        u_BL = self.token_uniforms(positions_B, L, K, stream)
        xt_BL, is_masked_BL = bd.mask_blocks(x0_BL, t_BK, u_BL, self.mask_id, bs)
        tokens, labels, weights = bd.two_half_inputs(x0_BL, xt_BL, bd.loss_weights(is_masked_BL, t_BK, bs))
        return Batch(tokens_BS=tokens, labels_BS=labels, loss_weight_BS=weights, t_B=t_BK.mean(dim=1).float(),
                     position_ids_BS=bd.two_half_positions(batch, L), attention_mask=bd.block_diffusion_mask(L, bs),
                     num_clean_tokens=batch * L)


REGISTRY: dict[str, type[Objective]] = {c.name: c for c in (MaskedDiffusion, Autoregressive, BlockDiffusion)}


def build_objective(dcfg, mask_id: int, seed: int) -> Objective:
    if dcfg.objective not in REGISTRY:
        from ..config import ConfigError

        raise ConfigError(
            f"diffusion.objective={dcfg.objective!r} is not implemented yet (available: {', '.join(sorted(REGISTRY))})"
        )
    return REGISTRY[dcfg.objective](dcfg, mask_id, seed)
