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
from .noise import TAG_EVAL, TAG_PROMPT_DROP, TAG_SAMPLE, TAG_STEP, generator


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
    model_kwargs: dict | None = None
    """Extra keyword inputs of the denoiser (e.g. continuous diffusion's sigma_B, noise_seed_B)."""
    logits_loss: object | None = None
    """Objectives whose loss needs the model's full distribution (uniform / hybrid noise):
    a callable (logits_BSV, batch) -> per-position loss contributions [B, S] (already
    weighted). The model is then called without labels; None = the per-token NLL path."""

    @property
    def num_tokens(self) -> int:
        """Normaliser of the loss: number of clean tokens B*L."""
        return int(self.num_clean_tokens if self.num_clean_tokens is not None else self.labels_BS.numel())


def step_random_length(seed: int, step: int, seq_len: int, prob: float, stream: int = TAG_STEP, multiple: int = 1) -> int:
    """LLaDA's random-length trick: with probability ``prob`` the whole step's batch is cut
    to a length drawn uniformly from [1, seq_len] (so the model sees short sequences).
    Decided per optimizer step (not per rank) so all micro-batches and ranks agree.
    ``multiple``: the drawn length is rounded up to a multiple of it, at most seq_len
    (sequence parallelism splits the sequence over parallel.tp ranks)."""
    if prob <= 0:
        return seq_len
    g = generator(seed, stream, step)
    if torch.rand((), generator=g).item() < prob:
        L = int(torch.randint(1, seq_len + 1, (), generator=g).item())
        return min(seq_len, -(-L // multiple) * multiple)
    return seq_len


class Objective:
    name = "base"
    causal = False
    length_multiple = 1
    """Random lengths are rounded up to a multiple of this (parallel.tp under sequence parallelism)."""

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

    def cut_and_sample_t(self, x0_BL, positions_B, *, step, global_batch_size, eval):
        """Shared prologue of the discrete objectives: the noise stream, LLaDA's random-length
        cut of the step's batch (training only) and the per-sequence noise levels."""
        stream = TAG_EVAL if eval else TAG_SAMPLE
        if not eval:
            L = step_random_length(self.seed, step, x0_BL.shape[1], self.dcfg.random_length_prob,
                                   multiple=self.length_multiple)
            x0_BL = x0_BL[:, :L]
        t_B = self.sample_t(positions_B, step=step, global_batch_size=global_batch_size, stream=stream)
        return x0_BL, t_B, stream

    def make_batch(self, x0_BL, positions_B, *, step, global_batch_size, eval=False):
        x0_BL, t_B, stream = self.cut_and_sample_t(x0_BL, positions_B, step=step, global_batch_size=global_batch_size, eval=eval)
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

    def sample_t(self, positions_B: torch.Tensor, *, step: int, global_batch_size: int, stream: int, K: int,
                 eval: bool = False) -> torch.Tensor:
        """Block noise levels.  -> [B, K] float64

        Training draws from the clipped schedule U[t_min, t_max]; evaluation (``eval``: the
        in-training validation and ``python -m dlm_megatron.eval``) always from U(eps, 1):
        only the full range integrates the ELBO (BD3-LM computes its NELBO so; the average
        over a clipped range is a biased number, not a bound)."""
        d = self.dcfg
        lo, hi = bd.eval_noise_range(d.eps) if eval else bd.noise_range(d.eps, d.t_min, d.t_max)
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
        t_BK = self.sample_t(positions_B, step=step, global_batch_size=global_batch_size, stream=stream, K=K, eval=eval)
        u_BL = self.token_uniforms(positions_B, L, K, stream)
        xt_BL, is_masked_BL = bd.mask_blocks(x0_BL, t_BK, u_BL, self.mask_id, bs)
        tokens, labels, weights = bd.two_half_inputs(x0_BL, xt_BL, bd.loss_weights(is_masked_BL, t_BK, bs))
        return Batch(tokens_BS=tokens, labels_BS=labels, loss_weight_BS=weights, t_B=t_BK.mean(dim=1).float(),
                     position_ids_BS=bd.two_half_positions(batch, L), attention_mask=bd.block_diffusion_mask(L, bs),
                     num_clean_tokens=batch * L)


REGISTRY: dict[str, type[Objective]] = {c.name: c for c in (MaskedDiffusion, Autoregressive, BlockDiffusion)}


def _interpolating_logits_loss(mask_id: int, num_clean: int, p_uniform: float, tp: dict, logits_BSV, b: "Batch"):
    from .uniform import interpolating_loss_contributions

    return interpolating_loss_contributions(logits_BSV, b.labels_BS, b.tokens_BS, b.t_B, b.loss_weight_BS,
                                            mask_id=mask_id, num_clean=num_clean, p_uniform=p_uniform, **tp)


class UniformDiffusion(MaskedDiffusion):
    """UDLM uniform-noise diffusion (Schiff et al. 2025): corrupted tokens become uniformly
    random clean tokens; loss = the exact continuous-time ELBO integrand from the model's full
    distribution (see diffusion/uniform.py); at TP > 1 its vocabulary sums are reduced over the
    tensor-parallel group (``set_tensor_parallel``).

    Noise keyed like MaskedDiffusion: per sample (seed, stream, global position) t first
    (stratified if diffusion.antithetic), then three L-vectors of uniforms (corrupt?,
    uniform-vs-MASK, which token)."""

    name = "uniform"
    p_uniform = 1.0
    vocab_size: int | None = None

    tensor_parallel: dict = {}

    def set_vocab_size(self, vocab_size: int) -> None:
        """Tokenizer vocabulary (clean ids + MASK); the model's padded rows are never used."""
        self.vocab_size = int(vocab_size)

    def set_tensor_parallel(self, group, rank: int, size: int) -> None:
        """The model's logits are vocabulary-parallel over ``group`` (size > 1): the loss
        reduces its vocabulary sums over it (diffusion/uniform.py)."""
        self.tensor_parallel = {"tp_group": group, "tp_rank": int(rank), "tp_size": int(size)} if size > 1 else {}

    def noise_uniforms(self, positions_B, L: int, stream: int):
        rows = []
        for p in positions_B:
            g = generator(self.seed, stream, int(p))
            torch.rand((), generator=g, dtype=torch.float64)  # skip the t draw
            rows.append(torch.rand(3, L, generator=g, dtype=torch.float64))
        u = torch.stack(rows)
        return u[:, 0], u[:, 1], u[:, 2]

    def make_batch(self, x0_BL, positions_B, *, step, global_batch_size, eval=False):
        from functools import partial

        from . import uniform as ud

        if self.vocab_size is None:
            raise RuntimeError("UniformDiffusion.set_vocab_size(tokenizer.vocab_size) must be called first")
        x0_BL, t_B, stream = self.cut_and_sample_t(x0_BL, positions_B, step=step, global_batch_size=global_batch_size, eval=eval)
        u, v, w = self.noise_uniforms(positions_B, x0_BL.shape[1], stream)
        num_clean = self.vocab_size - 1
        zt = ud.noise_tokens(x0_BL, t_B, u, v, w, num_clean=num_clean, mask_id=self.mask_id, p_uniform=self.p_uniform)
        return Batch(tokens_BS=zt, labels_BS=x0_BL, loss_weight_BS=torch.ones(x0_BL.shape, dtype=torch.float32),
                     t_B=t_B.float(), logits_loss=partial(_interpolating_logits_loss, self.mask_id, num_clean, self.p_uniform,
                                                 self.tensor_parallel))


class HybridDiffusion(UniformDiffusion):
    """Mask + uniform interpolating diffusion: a corrupted token becomes MASK with probability
    1 - p_u and a uniformly random clean token with probability p_u (diffusion.p_uniform).
    GIDD (von Rütte et al. 2025) with a constant mixing distribution; exact ELBO weights in
    diffusion/uniform.py."""

    name = "hybrid"

    def __init__(self, dcfg, mask_id: int, seed: int):
        super().__init__(dcfg, mask_id, seed)
        self.p_uniform = float(getattr(dcfg, "p_uniform", 0.1))


REGISTRY.update({c.name: c for c in (UniformDiffusion, HybridDiffusion)})


class SFTMaskedDiffusion(MaskedDiffusion):
    """LLaDA supervised fine-tuning (Nie et al. 2025, Sec. 2.3; GUIDELINES.md of the
    LLaDA repository): the prompt is never masked; each response token (EOT padding included)
    is masked with probability t; the loss is sum over masked response tokens of CE / t,
    divided by that sample's response length, averaged over the batch.

    Samples come from data/sft.py: int64 [L + 1] = tokens then the prompt length P. Noise
    keyed like MaskedDiffusion (t, then L token uniforms per global sample position), so an
    example's mask does not depend on the layout. Used when data.sft_path is set.

    ``diffusion.prompt_dropout`` p: with probability p a training example (never a validation
    one) also has its whole prompt masked, which trains the unconditional model that
    classifier-free guidance needs (LLaDA's unsupervised CFG masks the prompt at sampling time).
    The draw is one uniform per global sample position from its own stream, so the response's
    noise, the loss weights and the layout independence are unchanged.
    """

    name = "sft_masked"

    def prompt_drop_uniforms(self, positions_B: torch.Tensor) -> torch.Tensor:
        """One U[0, 1) per sample, keyed by (seed, global sample position).  -> [B] float64"""
        return torch.stack([torch.rand((), generator=generator(self.seed, TAG_PROMPT_DROP, int(p)), dtype=torch.float64)
                            for p in positions_B])

    def make_batch(self, x_BW, positions_B, *, step, global_batch_size, eval=False):
        stream = TAG_EVAL if eval else TAG_SAMPLE
        x0_BL, P_B = x_BW[:, :-1], x_BW[:, -1]
        B, L = x0_BL.shape
        t_B = self.sample_t(positions_B, step=step, global_batch_size=global_batch_size, stream=stream)
        u_BL = self.token_uniforms(positions_B, L, stream)
        response_BL = torch.arange(L)[None, :] >= P_B[:, None]
        u_BL = torch.where(response_BL, u_BL, torch.full_like(u_BL, 2.0))  # u >= 1: prompt never masked
        xt_BL, is_masked_BL = md.mask_tokens(x0_BL, t_B, u_BL, self.mask_id)
        p_drop = float(getattr(self.dcfg, "prompt_dropout", 0.0))
        if p_drop > 0.0 and not eval:
            drop_B = self.prompt_drop_uniforms(positions_B) < p_drop
            # The prompt carries no loss weight, so only the model's input changes.
            xt_BL = xt_BL.masked_fill(drop_B[:, None] & ~response_BL, self.mask_id)
        resp_len_B = response_BL.sum(1).clamp_min(1).to(torch.float32)
        # weighted_token_loss divides by B*L: scale by L / |response| to get LLaDA's per-sample normalisation.
        w_BL = md.masked_loss_weights(is_masked_BL, t_B) * (L / resp_len_B)[:, None]
        b = Batch(tokens_BS=xt_BL, labels_BS=x0_BL, loss_weight_BS=w_BL, t_B=t_B.float())
        # An AR-adapted (shifted) model keeps its convention when fine-tuned: output i-1
        # predicts response token i (the prompt is clean, so token 0 already is).
        return shift_batch(b) if getattr(self.dcfg, "shift_logits", False) else b


def shift_batch(b: Batch) -> Batch:
    """Re-index a masked-diffusion batch for shifted logits: token 0 clean with no loss,
    labels and weights moved to the output position before their token."""
    from . import adaptation as ad

    xt, w = ad.keep_first(b.tokens_BS, b.labels_BS, b.loss_weight_BS)
    labels, w = ad.shift_targets(b.labels_BS, w)
    b.num_clean_tokens = b.num_tokens
    b.tokens_BS, b.labels_BS, b.loss_weight_BS = xt, labels, w
    return b


def build_objective(dcfg, mask_id: int, seed: int, *, vocab_size: int | None = None, tp_group=None, tp_rank: int = 0,
                    tp_size: int = 1, length_multiple: int = 1) -> Objective:
    """The objective named by ``dcfg.objective``. Objectives whose loss reads the whole
    vocabulary (uniform, hybrid) also take the tokenizer's ``vocab_size`` and, at TP > 1, the
    tensor-parallel group their vocab-parallel logits are spread over; others ignore both.
    ``length_multiple``: see Objective.length_multiple."""
    obj = _new_objective(dcfg, mask_id, seed)
    obj.length_multiple = length_multiple
    if vocab_size is not None and hasattr(obj, "set_vocab_size"):
        obj.set_vocab_size(vocab_size)
    if hasattr(obj, "set_tensor_parallel"):
        obj.set_tensor_parallel(tp_group, tp_rank, tp_size)
    return obj


def _new_objective(dcfg, mask_id: int, seed: int) -> Objective:
    if dcfg.objective not in REGISTRY:
        from ..config import ConfigError

        raise ConfigError(
            f"diffusion.objective={dcfg.objective!r} is not implemented yet (available: {', '.join(sorted(REGISTRY))})"
        )
    if dcfg.objective == "masked" and (getattr(dcfg, "anneal_steps", 0) or getattr(dcfg, "shift_logits", False)):
        return AdaptedMaskedDiffusion(dcfg, mask_id, seed)
    return REGISTRY[dcfg.objective](dcfg, mask_id, seed)


class AdaptedMaskedDiffusion(MaskedDiffusion):
    """Masked diffusion adapted from an AR model (DiffuLLaMA, Gong et al. 2025; Dream, Ye et
    al. 2025): ``diffusion.anneal_steps`` anneals the attention mask from causal to full
    (one random mask per optimizer step, shared by all samples and ranks), and
    ``diffusion.shift_logits`` trains output i-1 to predict token i (token 0 stays clean).
    Noise (t, token masks) is exactly MaskedDiffusion's. Validation uses full attention:
    it measures the model being adapted to. See diffusion/adaptation.py."""

    name = "masked"

    def make_batch(self, x0_BL, positions_B, *, step, global_batch_size, eval=False):
        from . import adaptation as ad

        b = super().make_batch(x0_BL, positions_B, step=step, global_batch_size=global_batch_size, eval=eval)
        if self.dcfg.shift_logits:
            b = shift_batch(b)
        if self.dcfg.anneal_steps > 0:
            frac = 1.0 if eval else ad.anneal_fraction(step, self.dcfg.anneal_steps)
            b.attention_mask = ad.annealed_mask(b.tokens_BS.shape[1], frac, self.seed, step)
        return b


class ContinuousDiffusion(Objective):
    """CDCD continuous diffusion on normalised token embeddings (Dieleman et al. 2022), see
    diffusion/continuous.py. Per sample, from stream (seed, stream, global position): a
    log-uniform sigma in [sigma_min, sigma_max], then a 62-bit seed from which the model
    draws the Gaussian noise [L, H] on CPU (the objective does not know H); so TP peers
    and any DP layout add identical noise. Loss: cross-entropy on every token, weight 1
    (score interpolation), normalised by B*L. ``diffusion.random_length_prob`` is unused."""

    name = "continuous"

    def make_batch(self, x0_BL, positions_B, *, step, global_batch_size, eval=False):
        from . import continuous as cd

        stream = TAG_EVAL if eval else TAG_SAMPLE
        u, seeds = [], []
        for p in positions_B:
            g = generator(self.seed, stream, int(p))
            u.append(torch.rand((), generator=g, dtype=torch.float64))
            seeds.append(torch.randint(0, 2**62, (), generator=g))
        sigma_B = cd.sigma_from_uniform(torch.stack(u), self.dcfg.sigma_min, self.dcfg.sigma_max).float()
        return Batch(tokens_BS=x0_BL, labels_BS=x0_BL, loss_weight_BS=torch.ones(x0_BL.shape, dtype=torch.float32),
                     t_B=sigma_B, model_kwargs={"sigma_B": sigma_B, "noise_seed_B": torch.stack(seeds)})


REGISTRY[ContinuousDiffusion.name] = ContinuousDiffusion
