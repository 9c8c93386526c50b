"""Uniform (UDLM) and hybrid (mask + uniform) noise: the per-sample loss is an unbiased
estimate of the exact ELBO, checked by brute force on a tiny vocabulary and sequence.

Independent reference: the discrete-time diffusion bound sum_k E KL(q(z_s|z_t,x) || p(z_s|z_t))
with T steps, computed by enumerating every z_t in S^L and every z_s, using only the marginals
q_t(z|x) = alpha_t e_x + (1 - alpha_t) pi and Bayes' rule (no rates, no closed form). As
T -> infinity it converges to the continuous-time bound that diffusion/uniform.py implements.
"""
import itertools
import math

import pytest
import torch

from dlm_megatron.diffusion import uniform as ud



@pytest.fixture(autouse=True)
def _float64_default():
    """The brute-force references need float64; scoped to this module's tests (a module-level
    set_default_dtype would leak into every later test of the session)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


C = 3          # clean tokens
MASK = 1       # MASK id sits inside the id range (model ids 0, 2, 3 are clean)
L = 2
X0 = torch.tensor([3, 0])


def states(p_u):
    clean = [0, 2, 3]
    return clean + ([MASK] if p_u < 1 else [])


def pi_vec(p_u, S):
    return torch.tensor([(1 - p_u) if s == MASK else p_u / C for s in S])


def marg(x, t, p_u, S):
    """q_t(. | x) over S for a clean id x or a distribution over clean ids (dict id->prob)."""
    a = 1 - t
    xv = torch.tensor([float(s == x) for s in S]) if not isinstance(x, torch.Tensor) else x
    return a * xv + (1 - a) * pi_vec(p_u, S)


def make_denoiser(S, seed=0):
    """A fixed denoiser: for every z in S^L, per-position logits over the C clean ids."""
    g = torch.Generator().manual_seed(seed)
    return {z: torch.randn(L, C, generator=g) * 1.5 for z in itertools.product(S, repeat=L)}


def x_theta_full(logits_LC, S):
    """Clean distribution spread onto S (0 on MASK)."""
    p = torch.softmax(logits_LC, -1)
    out = torch.zeros(L, len(S))
    for ci, cid in enumerate([0, 2, 3]):
        out[:, S.index(cid)] = p[:, ci]
    return out


def discrete_bound(table, p_u, T):
    S = states(p_u)
    total = 0.0
    ts = [k / T for k in range(T + 1)]
    for k in range(1, T + 1):
        t, s = ts[k], ts[k - 1]
        a_ts = (1 - t) / (1 - s)
        pi = pi_vec(p_u, S)
        # one-step kernel K[zs, zt] = q(z_t | z_s)
        K = a_ts * torch.eye(len(S)) + (1 - a_ts) * pi[None, :]
        for z in itertools.product(S, repeat=L):
            prob = math.prod(marg(int(X0[i]), t, p_u, S)[S.index(z[i])].item() for i in range(L))
            if prob == 0:
                continue
            xth = x_theta_full(table[z], S)
            kl = 0.0
            for i in range(L):
                zi = S.index(z[i])
                qs = marg(int(X0[i]), s, p_u, S) * K[:, zi]
                qs = qs / qs.sum()
                ps = marg(xth[i], s, p_u, S) * K[:, zi]
                ps = ps / ps.sum()
                nz = qs > 0
                kl += (qs[nz] * (qs[nz].log() - ps[nz].log())).sum().item()
            total += prob * kl
    return total


def expected_f(table, p_u, t):
    """E_{z_t ~ q_t(.|x0)} sum_i f_t(z_t) by enumeration, with the implementation under test."""
    S = states(p_u)
    zs = list(itertools.product(S, repeat=L))
    z_BL = torch.tensor(zs)
    logp = torch.log_softmax(torch.stack([table[z] for z in zs]), -1)
    f = ud.interpolating_elbo_terms(logp, X0.expand(len(zs), L), z_BL, torch.full((len(zs),), t), mask_id=MASK, p_uniform=p_u)
    prob = torch.tensor([math.prod(marg(int(X0[i]), t, p_u, S)[S.index(z[i])].item() for i in range(L)) for z in zs])
    return (prob * f.sum(-1)).sum().item()


def continuous_bound(table, p_u, n=400):
    """Gauss-Legendre quadrature of int_0^1 E f_t dt."""
    nodes, weights = torch.tensor(0.0), None
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return sum(wk / 2 * expected_f(table, p_u, (xk + 1) / 2) for xk, wk in zip(x, w))


@pytest.mark.parametrize("p_u", [1.0, 0.3])
def test_continuous_bound_matches_discrete_time_kl_sum(p_u):
    table = make_denoiser(states(p_u))
    cont = continuous_bound(table, p_u, n=100)
    d1, d2 = discrete_bound(table, p_u, 100), discrete_bound(table, p_u, 200)
    extrapolated = 2 * d2 - d1  # the discrete bound converges at O(1/T): Richardson extrapolation
    assert abs(d2 - cont) < 0.01 * cont, (d1, d2, cont)
    assert cont == pytest.approx(extrapolated, rel=2e-4), (cont, d1, d2, extrapolated)


@pytest.mark.parametrize("p_u", [1.0, 0.3])
def test_monte_carlo_average_of_per_sample_loss_is_the_bound(p_u):
    """t ~ U(0,1), z_t drawn by noise_tokens (the training forward process), loss = sum of f."""
    S = states(p_u)
    table = make_denoiser(S)
    cont = continuous_bound(table, p_u, n=100)
    n = 200_000
    g = torch.Generator().manual_seed(1)
    t = torch.rand(n, generator=g)
    u, v, w = (torch.rand(n, L, generator=g) for _ in range(3))
    z = ud.noise_tokens(X0.expand(n, L), t, u, v, w, num_clean=C, mask_id=MASK, p_uniform=p_u)
    index = {zz: k for k, zz in enumerate(itertools.product(S, repeat=L))}
    logits = torch.stack([table[zz] for zz in itertools.product(S, repeat=L)])
    idx = torch.tensor([index[tuple(r)] for r in z.tolist()])
    # the full-vocabulary path: logits over model ids 0..C (MASK column = junk, must be ignored)
    logits_V = torch.zeros(len(index), L, C + 1)
    logits_V[..., [0, 2, 3]] = logits
    logits_V[..., MASK] = 7.0
    contrib = ud.interpolating_loss_contributions(logits_V[idx], X0.expand(n, L), z, t, torch.ones(n, L), mask_id=MASK,
                                                  num_clean=C, p_uniform=p_u)
    per_sample = contrib.sum(-1)
    est, se = per_sample.mean().item(), per_sample.std().item() / math.sqrt(n)
    assert abs(est - cont) < 4 * se + 1e-4, (est, se, cont)
    assert se < 0.02 * cont


def test_hybrid_tends_to_masked_diffusion_loss():
    """p_u -> 0: MASKed tokens cost (1/t) * CE (MDLM / LLaDA), unmasked tokens ~0."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, L, C, generator=g), -1)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    z = torch.tensor([[MASK, 0], [MASK, MASK], [3, MASK], [MASK, 0]])
    x0 = torch.tensor([[3, 0], [3, 0], [3, 0], [3, 0]])
    f = ud.interpolating_elbo_terms(logp, x0, z, t, mask_id=MASK, p_uniform=1e-9)
    ce = -logp.gather(-1, ud.model_to_clean_ids(x0, MASK)[..., None])[..., 0]
    want = torch.where(z == MASK, ce / t[:, None], torch.zeros_like(ce))
    assert torch.allclose(f, want, atol=1e-6)


def test_stable_near_t_one_in_fp32():
    g = torch.Generator().manual_seed(0)
    logp64 = torch.log_softmax(torch.randn(2, 5, 200, generator=g), -1)
    x0 = torch.randint(2, 200, (2, 5), generator=g)
    z = torch.randint(2, 200, (2, 5), generator=g)
    for t in (1 - 1e-3, 1 - 1e-5):
        tt = torch.full((2,), t)
        f64 = ud.interpolating_elbo_terms(logp64, x0, z, tt, mask_id=1, p_uniform=1.0)
        f32 = ud.interpolating_elbo_terms(logp64.float(), x0, z, tt.float(), mask_id=1, p_uniform=1.0)
        assert torch.isfinite(f32).all()
        assert torch.allclose(f32.double(), f64, atol=1e-3 * f64.abs().max().item() + 1e-4)


def test_noise_tokens_marginals():
    n = 100_000
    g = torch.Generator().manual_seed(2)
    t = torch.full((n,), 0.6)
    u, v, w = (torch.rand(n, 1, generator=g) for _ in range(3))
    z = ud.noise_tokens(torch.full((n, 1), 3), t, u, v, w, num_clean=C, mask_id=MASK, p_uniform=0.3)
    want = marg(3, 0.6, 0.3, states(0.3))
    got = torch.tensor([(z == s).double().mean().item() for s in states(0.3)])
    assert torch.allclose(got, want, atol=0.01)


def test_posterior_probs_match_bayes():
    S = states(0.3)
    g = torch.Generator().manual_seed(3)
    xth = torch.softmax(torch.randn(1, 1, C, generator=g), -1)
    for zt in S:
        p = ud.posterior_probs(xth, torch.tensor([[zt]]), 0.7, 0.4, mask_id=MASK, p_uniform=0.3)[0, 0]
        # reference over S ordered as clean ids then MASK
        order = [0, 2, 3, MASK]
        xs = torch.tensor([xth[0, 0, 0], 0.0, xth[0, 0, 1], xth[0, 0, 2]])  # over model ids 0..3
        ms = 0.6 * xs + 0.4 * torch.tensor([0.1, 0.7, 0.1, 0.1])
        a_ts = 0.3 / 0.6
        Kz = a_ts * torch.tensor([float(s == zt) for s in range(4)]) + (1 - a_ts) * torch.tensor([0.1, 0.7, 0.1, 0.1])[zt]
        ref = ms * Kz
        ref = ref / ref.sum()
        assert torch.allclose(p, ref[order], atol=1e-9)


@pytest.mark.parametrize("objective", ["uniform", "hybrid"])
def test_t_at_one_gives_a_finite_loss(objective, monkeypatch):
    """t ~ U(eps, 1) is drawn in float64 but reaches the loss as float32, where a draw above
    1 - 2^-25 is exactly 1.0 (alpha = 0). At t = 1 - 1e-9 and at t = 1 the loss and its
    gradient must be finite, and near their t -> 1 limit (0), for the objective's batch, the
    vocab-parallel path and fp32 logits."""
    from types import SimpleNamespace

    from dlm_megatron.diffusion.objectives import build_objective

    V, mask_id, Lx = 50, 49, 6
    dcfg = SimpleNamespace(objective=objective, eps=1e-3, antithetic=False, random_length_prob=0.0, p_uniform=0.3)
    obj = build_objective(dcfg, mask_id, 0, vocab_size=V)
    t_fixed = torch.tensor([1 - 1e-9, 1.0, 0.5], dtype=torch.float64)
    monkeypatch.setattr(obj, "sample_t", lambda positions_B, **kw: t_fixed.clone())
    x0 = torch.randint(0, mask_id, (3, Lx), generator=torch.Generator().manual_seed(1))
    b = obj.make_batch(x0, torch.arange(3), step=0, global_batch_size=3)
    assert b.t_B.dtype == torch.float32 and b.t_B[0].item() == 1.0  # the rounding this guards against
    logits = torch.randn(3, Lx, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float32).requires_grad_(True)
    per_pos = b.logits_loss(logits, b)
    loss = per_pos.sum() / b.num_tokens
    loss.backward()
    assert torch.isfinite(per_pos).all() and torch.isfinite(logits.grad).all(), per_pos
    rows = per_pos.sum(-1)
    assert rows[:2].abs().max() < 1e-3 * rows[2], rows  # t -> 1: the integrand vanishes
    f_vp = ud.interpolating_elbo_terms_vocab_parallel(logits.detach(), b.labels_BS, b.tokens_BS, b.t_B, mask_id=mask_id,
                                                      num_clean=V - 1, p_uniform=obj.p_uniform, vocab_start=0, group=None)
    assert torch.isfinite(f_vp).all()
    torch.testing.assert_close(f_vp, per_pos.detach(), rtol=1e-4, atol=1e-6)
