"""Uniform and hybrid (mask + uniform) discrete noise: forward process and continuous-time ELBO.

Both are *interpolating* processes on one token at a time (factorised over positions):

    q_t(z | x) = alpha_t * e_x + (1 - alpha_t) * pi,     alpha_t = 1 - t (linear schedule)

i.e. with probability 1 - alpha_t the token is replaced by a draw from the fixed noise
distribution ``pi``:

* uniform (UDLM, Schiff et al. 2025, "Simple Guidance Mechanisms for Discrete Diffusion
  Models", Sec. 3: the continuous-time NELBO for uniform noise): pi = uniform over the N clean token ids (MASK excluded);
* hybrid: pi = (1 - p_u) e_MASK + p_u * uniform. This is the generalised interpolating
  diffusion of GIDD (von Rütte et al. 2025, "Generalized Interpolating Discrete Diffusion")
  with a *constant* mixing distribution pi_t = pi (GIDD lets pi_t vary with t; we keep it
  fixed so the process is the one-parameter interpolation between MDLM (p_u -> 0) and UDLM
  (p_u = 1)).

Denoiser parameterisation (as in MDLM/UDLM/GIDD): the reverse step is the true posterior with
x replaced by the model's distribution x_theta, p(z_s | z_t) = q(z_s | z_t, x = x_theta). The
continuous-time negative ELBO (Campbell et al. 2022, "A Continuous Time Framework for Discrete
Denoising Models": the CTMC ELBO; here with forward rates R_t(y -> z) = -alpha'_t/alpha_t pi(z)) is

    NELBO(x) = int_0^1 E_{z ~ q_t(.|x)} f_t(z, x, x_theta) dt       (prior and reconstruction
                                                                      terms vanish: alpha_1 = 0,
                                                                      alpha_0 = 1)
    f_t = sum_{y != z} [ Rθ(z,y) - Rx(z,y) - Rx(z,y) log(Rθ(z,y) / Rx(z,y)) ] >= 0,
    Rx(z,y) = -alpha'/alpha pi(z) m(y)/m(z),    m  = alpha e_x + beta pi      (true reverse rate)
    Rθ(z,y) = -alpha'/alpha pi(z) mθ(y)/mθ(z),  mθ = alpha x_theta + beta pi  (model's)

With d = mθ - m = alpha (x_theta - e_x) (sums to 0) this simplifies to the numerically stable

    f_t = -alpha'/alpha * pi(z)/m(z) * [ log1p(d_z/m_z) - d_z/mθ_z - sum_y m_y log1p(d_y/m_y) ]

(every term is O(alpha), the bracket O(alpha^2): no catastrophic cancellation near t = 1,
where the naive 1/mθ_z - 1/m_z form loses all precision in fp32). For pi = e_MASK it reduces
to MDLM's (1/t) * CE on masked tokens; for pi uniform it is UDLM's NELBO (their x̄ = N m).
The brute-force check in tests/unit/test_uniform.py compares it with the discrete-time KL sum.

Sampling t ~ U(eps, 1) and averaging f_t over tokens gives an unbiased estimate of the bound
on (eps, 1); the (0, eps) sliver is dropped as in MDLM.

Time conditioning: none. Following UDLM/GIDD (and MDLM, where it was shown unnecessary) the
denoiser sees only z_t; the noise level is inferable from the fraction of corrupted tokens.

Shape legend: B batch, L length, C clean vocabulary (N token ids, MASK excluded), V model vocabulary.
Randomness enters as uniforms so these functions are pure.
"""
from __future__ import annotations

import torch


def alpha(t: torch.Tensor) -> torch.Tensor:
    """Linear schedule alpha_t = 1 - t (probability that a token is still clean)."""
    return 1.0 - t


# Smallest alpha_t the ELBO integrand is evaluated at. Noise levels reach the loss as fp32,
# and a draw t > 1 - 2^-25 (about 3e-8 of all draws) rounds to exactly 1.0 there: alpha = 0
# would turn the integrand into 0 * inf = NaN (a skipped training step, a NaN in eval). The
# integrand vanishes like O(alpha) as t -> 1, so evaluating it at 2^-24 (the fp32 spacing
# below 1) instead is exact to within that sliver of t.
ALPHA_MIN = 2.0 ** -24


def elbo_alpha(t_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """alpha_t for the ELBO integrand: computed in float64, floored at ``ALPHA_MIN``, cast to
    ``dtype``.  [B] -> [B]"""
    return alpha(t_B.double()).clamp_min(ALPHA_MIN).to(dtype)


def dalpha(t: torch.Tensor) -> torch.Tensor:
    """d alpha / dt for the linear schedule (= -1)."""
    return -torch.ones_like(t)


def clean_to_model_ids(k: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Clean-vocabulary index k in [0, N) -> model token id (skipping MASK)."""
    return k + (k >= mask_id).to(k.dtype)


def model_to_clean_ids(ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Model token id (not MASK) -> clean-vocabulary index in [0, N)."""
    return ids - (ids > mask_id).to(ids.dtype)


def noise_tokens(x0_BL: torch.Tensor, t_B: torch.Tensor, u_BL: torch.Tensor, v_BL: torch.Tensor, w_BL: torch.Tensor,
                 *, num_clean: int, mask_id: int, p_uniform: float) -> torch.Tensor:
    """Forward process: z ~ q_t(. | x0).  Uniforms u (corrupt?), v (uniform vs MASK), w (which token).

    Token i is corrupted iff u < 1 - alpha_t = t; a corrupted token becomes a uniformly drawn
    clean token (possibly itself) if v < p_uniform, otherwise MASK. Returns z_BL (model ids).
    """
    corrupt = u_BL < (1.0 - alpha(t_B))[:, None].to(u_BL.dtype)
    rand_ids = clean_to_model_ids(torch.clamp((w_BL * num_clean).long(), max=num_clean - 1), mask_id)
    noise = torch.where(v_BL < p_uniform, rand_ids, torch.full_like(x0_BL, mask_id))
    return torch.where(corrupt, noise, x0_BL)


def clean_log_probs(logits_BLV: torch.Tensor, mask_id: int, num_clean: int) -> torch.Tensor:
    """log x_theta over the clean vocabulary: drop the MASK column and padded rows.  -> [B, L, C] fp32."""
    V = num_clean + 1  # tokenizer vocabulary: clean ids + MASK
    logits = logits_BLV[..., :V].float()
    logits = torch.cat([logits[..., :mask_id], logits[..., mask_id + 1:]], dim=-1)
    return torch.log_softmax(logits, dim=-1)


def interpolating_elbo_terms(logp_BLC: torch.Tensor, x0_BL: torch.Tensor, zt_BL: torch.Tensor, t_B: torch.Tensor,
                             *, mask_id: int, p_uniform: float) -> torch.Tensor:
    """Per-token continuous-time NELBO integrand f_t(z_t, x0, x_theta) (see module docstring).  -> [B, L] fp32

    ``logp_BLC``: log x_theta over the C clean ids; ``x0_BL``/``zt_BL``: model ids (x0 never
    MASK); ``p_uniform`` in (0, 1]: weight of the uniform part of pi (1 = UDLM).
    """
    if not 0.0 < p_uniform <= 1.0:
        raise ValueError(f"p_uniform must be in (0, 1], got {p_uniform}")
    B, L, C = logp_BLC.shape
    dt = logp_BLC.dtype
    a = elbo_alpha(t_B, dt)[:, None, None]                # [B,1,1], > 0 even where t rounded to 1
    b = 1.0 - a
    neg_da = (-dalpha(t_B)).to(dt)[:, None]               # [B,1]
    pi_c = p_uniform / C                                  # pi of each clean id
    xt = model_to_clean_ids(x0_BL, mask_id)               # x0 as clean index
    onehot = torch.zeros_like(logp_BLC).scatter_(-1, xt[..., None], 1.0)
    x_theta = logp_BLC.exp()
    m = a * onehot + b * pi_c                             # [B,L,C] (> 0 for t > 0)
    d = a * (x_theta - onehot)                            # mθ - m
    sum_term = (m * torch.log1p(d / m)).sum(-1)           # sum_y m_y log1p(d_y/m_y) over clean y (MASK's d is 0)
    z_is_mask = zt_BL == mask_id
    zc = model_to_clean_ids(torch.where(z_is_mask, x0_BL, zt_BL), mask_id)
    x_theta_z = x_theta.gather(-1, zc[..., None])[..., 0]
    return _integrand_from_sums(sum_term, x_theta_z, (zc == xt).to(dt), z_is_mask, a[..., 0], neg_da, pi_c)


def _integrand_from_sums(sum_term_BL: torch.Tensor, x_theta_z_BL: torch.Tensor, same_BL: torch.Tensor,
                         z_is_mask_BL: torch.Tensor, a_B1: torch.Tensor, neg_da_B1: torch.Tensor, pi_c: float) -> torch.Tensor:
    """f_t from the only vocabulary-wide quantities it needs (shared by the full-vocabulary and
    the vocab-parallel paths).  -> [B, L]

    ``sum_term``: sum_y m_y log1p(d_y/m_y); ``x_theta_z``: the model's probability of z_t (of x0
    where z_t is MASK); ``same``: 1.0 where z_t == x0; ``a``: alpha_t; ``neg_da``: -alpha'_t."""
    b = 1.0 - a_B1
    m_z = a_B1 * same_BL + b * pi_c
    d_z = a_B1 * (x_theta_z_BL - same_BL)
    clean_bracket = torch.log1p(d_z / m_z) - d_z / (m_z + d_z) - sum_term_BL
    clean_f = pi_c / m_z * clean_bracket
    # z = MASK: pi(MASK) = 1 - p_u, m(MASK) = beta (1 - p_u), d(MASK) = 0 -> f = -sum_term / beta.
    mask_f = -sum_term_BL / b
    f = torch.where(z_is_mask_BL, mask_f, clean_f)
    return neg_da_B1 / a_B1 * f


def interpolating_loss_contributions(logits_BSV: torch.Tensor, x0_BL: torch.Tensor, zt_BL: torch.Tensor, t_B: torch.Tensor,
                                     weight_BL: torch.Tensor, *, mask_id: int, num_clean: int, p_uniform: float,
                                     tp_group=None, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """Per-position loss contributions from model logits.  -> [B, L]

    TP=1: ``logits_BSV`` has the full (padded) vocabulary. TP>1: it is TP rank ``tp_rank``'s
    vocabulary-parallel slice and the reductions run over ``tp_group``.
    ``weight_BL`` selects positions (1 = in the loss, 0 = e.g. a prompt token); positions with
    weight 0 contribute an exact 0 even if their logits are non-finite.
    """
    if tp_size > 1:
        Vl = logits_BSV.shape[-1]
        f = interpolating_elbo_terms_vocab_parallel(logits_BSV, x0_BL, zt_BL, t_B.to(logits_BSV.device), mask_id=mask_id,
                                                    num_clean=num_clean, p_uniform=p_uniform, vocab_start=tp_rank * Vl,
                                                    group=tp_group)
    else:
        if logits_BSV.shape[-1] < num_clean + 1:
            raise ValueError(f"logits have {logits_BSV.shape[-1]} columns, fewer than the vocabulary ({num_clean + 1}); "
                             f"pass the tensor-parallel group for vocabulary-parallel logits")
        logp = clean_log_probs(logits_BSV, mask_id, num_clean)
        f = interpolating_elbo_terms(logp, x0_BL.to(logp.device), zt_BL.to(logp.device), t_B.to(logp.device),
                                     mask_id=mask_id, p_uniform=p_uniform)
    w = weight_BL.to(f.device, f.dtype)
    return torch.where(w != 0, f * w, torch.zeros_like(f))


# --------------------------------------------------------------------------------------------
# Tensor parallel: the same integrand from vocabulary-parallel logits


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) over ``group`` in forward, identity in backward. Right for a sum of
    per-rank terms that the (replicated) loss uses only through the sum: every rank gets the
    same dL/dsum and passes it to its own terms."""

    @staticmethod
    def forward(ctx, x, group):
        from ..parallel import comm

        return comm.all_reduce_(x.clone(), "sum", group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log softmax over the columns where ``valid`` is True, the columns spread over the ranks of
    ``group``; -inf elsewhere.  [B, L, Vl] -> [B, L, Vl]

    The normaliser is shared by every rank's columns, so its gradient needs every rank's
    share: backward is g - p * sum_all_ranks(g) (one all-reduce), which an identity-backward
    sum would get wrong (each rank would only see its own columns' pull on the normaliser)."""

    @staticmethod
    def forward(ctx, logits, valid, group):
        from ..parallel import comm

        row_max = torch.where(valid, logits, float("-inf")).max(-1, keepdim=True).values
        comm.all_reduce_(row_max, "max", group)
        e = torch.where(valid, (logits - row_max).exp(), torch.zeros_like(logits))
        z = e.sum(-1, keepdim=True)
        comm.all_reduce_(z, "sum", group)
        ctx.save_for_backward(e / z, valid)
        ctx.group = group
        return torch.where(valid, logits - row_max - z.log(), float("-inf"))

    @staticmethod
    def backward(ctx, grad):
        from ..parallel import comm

        p, valid = ctx.saved_tensors
        grad = torch.where(valid, grad, torch.zeros_like(grad))
        total = grad.sum(-1, keepdim=True)
        comm.all_reduce_(total, "sum", ctx.group)
        return grad - p * total, None, None


def interpolating_elbo_terms_vocab_parallel(logits_BLVl: torch.Tensor, x0_BL: torch.Tensor, zt_BL: torch.Tensor,
                                            t_B: torch.Tensor, *, mask_id: int, num_clean: int, p_uniform: float,
                                            vocab_start: int, group) -> torch.Tensor:
    """``interpolating_elbo_terms`` when each tensor-parallel rank holds the model-vocabulary
    columns [vocab_start, vocab_start + Vl) of the logits (megatron's vocab-parallel output
    layer).  -> [B, L] fp32, identical on every rank of ``group``.

    Only three quantities cross ranks, each a sum over the vocabulary: the softmax normaliser
    (``_VocabParallelLogSoftmax``), ``sum_y m_y log1p(d_y/m_y)`` and x_theta at z (a one-hot
    sum); the rest is ``_integrand_from_sums``, as for the full vocabulary. Columns outside the clean
    vocabulary (MASK, padded rows) are excluded exactly as ``clean_log_probs`` drops them.
    """
    if not 0.0 < p_uniform <= 1.0:
        raise ValueError(f"p_uniform must be in (0, 1], got {p_uniform}")
    logits = logits_BLVl.to(torch.promote_types(logits_BLVl.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    Vl = logits.shape[-1]
    ids = torch.arange(vocab_start, vocab_start + Vl, device=logits.device)  # global model ids of my columns
    clean = (ids < num_clean + 1) & (ids != mask_id)                          # [Vl]
    logp = _VocabParallelLogSoftmax.apply(logits, clean.expand_as(logits), group)
    x_theta = torch.where(clean, logp.exp(), torch.zeros_like(logits))       # [B,L,Vl], 0 off the clean ids

    dt = x_theta.dtype
    a = elbo_alpha(t_B, dt)[:, None, None]
    b = 1.0 - a
    neg_da = (-dalpha(t_B)).to(dt)[:, None]
    pi_c = p_uniform / num_clean
    x0 = x0_BL.to(logits.device)
    zt = zt_BL.to(logits.device)
    onehot = (ids == x0[..., None]).to(dt)
    m = a * onehot + b * pi_c
    d = a * (x_theta - onehot)
    local_sum = torch.where(clean, m * torch.log1p(d / m), torch.zeros_like(m)).sum(-1)
    sum_term = _SumOverRanks.apply(local_sum, group)                           # [B,L]
    z_is_mask = zt == mask_id
    z = torch.where(z_is_mask, x0, zt)
    x_theta_z = _SumOverRanks.apply((x_theta * (ids == z[..., None])).sum(-1), group)
    return _integrand_from_sums(sum_term, x_theta_z, (z == x0).to(dt), z_is_mask, a[..., 0], neg_da, pi_c)


# --------------------------------------------------------------------------------------------
# Reverse process (for the ancestral sampler)


def posterior_probs(x_theta_BLC: torch.Tensor, zt_BL: torch.Tensor, t: float, s: float, *, mask_id: int,
                    p_uniform: float) -> torch.Tensor:
    """p(z_s | z_t) = q(z_s | z_t, x = x_theta) over clean ids + MASK (last column).  -> [B, L, C+1]

    q(z_s | z_t, x) ∝ q(z_t | z_s) q(z_s | x); the one-step kernel from s to t is itself
    interpolating: q(z_t | z_s) = a_ts e_{z_s} + (1 - a_ts) pi with a_ts = alpha_t / alpha_s.
    """
    B, L, C = x_theta_BLC.shape
    dt = x_theta_BLC.dtype
    a_s, a_t = 1.0 - s, 1.0 - t
    a_ts = a_t / a_s if a_s > 0 else 0.0
    pi = torch.full((C + 1,), p_uniform / C, dtype=dt)
    pi[C] = 1.0 - p_uniform
    ms = torch.cat([a_s * x_theta_BLC, torch.zeros(B, L, 1, dtype=dt)], -1) + (1 - a_s) * pi  # q(z_s | x_theta)
    zi = torch.where(zt_BL == mask_id, torch.full_like(zt_BL, C), model_to_clean_ids(zt_BL, mask_id))
    pi_z = pi[zi][..., None]                                                # pi(z_t)
    trans = (1 - a_ts) * pi_z + a_ts * torch.zeros(B, L, C + 1, dtype=dt).scatter_(-1, zi[..., None], 1.0)
    p = ms * trans
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)
