"""Masked diffusion forward process and loss against a hand-written LLaDA reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from dlm_megatron.config import DiffusionConfig
from dlm_megatron.diffusion import masked as md
from dlm_megatron.diffusion.objectives import MaskedDiffusion, step_random_length

MASK = 7


def llada_reference_loss(logits_BLV, x0_BL, t_B, u_BL, mask_id):
    """LLaDA's published pseudocode, written out with explicit loops over tokens:
    masked iff u < p_mask; loss = sum over masked of CE / p_mask, divided by B*L."""
    B, L, _ = logits_BLV.shape
    total = 0.0
    for b in range(B):
        for i in range(L):
            if u_BL[b, i] < t_B[b]:
                logp = logits_BLV[b, i].log_softmax(-1)[x0_BL[b, i]].item()
                total += -logp / t_B[b].item()
    return total / (B * L)


def test_forward_process_and_loss_match_reference():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 11, 13
    x0 = torch.randint(0, V, (B, L), generator=g)
    x0[x0 == MASK] = 0  # keep MASK out of the clean data so xt == MASK means 'noised'
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    u = torch.rand(B, L, generator=g, dtype=torch.float64)
    xt, m = md.mask_tokens(x0, t, u, MASK)
    # Hand check of the noising: exactly the positions with u < t are MASK.
    for b in range(B):
        for i in range(L):
            assert (xt[b, i].item() == MASK) == (u[b, i].item() < t[b].item())
            if not m[b, i]:
                assert xt[b, i] == x0[b, i]
    logits = torch.randn(B, L, V, generator=g)
    nll = F.cross_entropy(logits.reshape(-1, V), x0.reshape(-1), reduction="none").reshape(B, L)
    loss = md.weighted_token_loss(nll, md.masked_loss_weights(m, t))
    ref = llada_reference_loss(logits, x0, t, u, MASK)
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    assert m.sum() > 0


def test_unmasked_tokens_contribute_nothing():
    B, L = 2, 8
    t = torch.tensor([0.3, 0.6])
    m = torch.zeros(B, L, dtype=torch.bool)
    m[0, 2] = m[1, 5] = True
    w = md.masked_loss_weights(m, t)
    nll = torch.rand(B, L)
    base = md.weighted_token_loss(nll, w)
    nll2 = nll.clone()
    nll2[~m] = float("nan")  # garbage at unmasked positions must not leak
    nll2[0, 0] = 1e9
    assert md.weighted_token_loss(nll2, w).item() == pytest.approx(base.item())
    # and the value is exactly the two masked terms over B*L
    expect = (nll[0, 2] / 0.3 + nll[1, 5] / 0.6) / (B * L)
    assert base.item() == pytest.approx(expect.item(), rel=1e-6)


def test_t_range_and_stratified():
    """stratified_uniform puts exactly one value in each of the n strata [k/n, (k+1)/n), all
    shifted by the offset; t_from_uniform maps U[0, 1) onto U[eps, 1): t(0) = eps, t < 1,
    increasing, and uniform draws stay uniform (the objective's i.i.d. t included)."""
    for offset, n in ((0.37, 8), (0.0, 5), (0.999, 16), (1.25, 4)):
        u = md.stratified_uniform(offset, n)
        assert u.shape == (n,) and bool(((u >= 0) & (u < 1)).all())
        assert sorted((u * n).floor().long().tolist()) == list(range(n))    # one per stratum
        assert u.min().item() == pytest.approx(math.fmod(offset, 1 / n), abs=1e-12)  # the offset shifts them all
    assert not torch.equal(md.stratified_uniform(0.1, 8), md.stratified_uniform(0.2, 8))
    eps = 1e-3
    grid = torch.linspace(0, 1 - 1e-9, 1001, dtype=torch.float64)
    t = md.t_from_uniform(grid, eps)
    assert t[0].item() == eps and t.max().item() < 1.0 and bool((t[1:] > t[:-1]).all())
    # i.i.d. levels of the objective: within [eps, 1) and uniform there (Kolmogorov-Smirnov distance).
    obj = _obj(eps=0.2)
    draws = obj.sample_t(torch.arange(4000), step=0, global_batch_size=4000, stream=1).sort().values
    assert draws.min().item() >= 0.2 and draws.max().item() < 1.0
    ecdf = torch.arange(1, 4001, dtype=torch.float64) / 4000
    assert (ecdf - (draws - 0.2) / 0.8).abs().max().item() < 0.03


def _obj(**kw):
    return MaskedDiffusion(DiffusionConfig(random_length_prob=0.0, **kw), MASK, seed=5)


def test_noise_depends_on_sample_not_on_batch_slicing():
    """The same global sample gets the same t and mask whatever micro-batch/rank holds it."""
    obj = _obj()
    x = torch.randint(10, 50, (8, 16))
    pos = torch.arange(16, 24)
    full = obj.make_batch(x, pos, step=2, global_batch_size=8)
    halves = [obj.make_batch(x[i:i + 4], pos[i:i + 4], step=2, global_batch_size=8) for i in (0, 4)]
    assert torch.equal(full.tokens_BS, torch.cat([h.tokens_BS for h in halves]))
    assert torch.equal(full.t_B, torch.cat([h.t_B for h in halves]))
    other = obj.make_batch(x, pos + 8, step=3, global_batch_size=8)
    assert not torch.equal(full.tokens_BS, other.tokens_BS)


def test_antithetic_t_is_stratified_across_the_global_batch():
    obj = _obj(antithetic=True, eps=1e-3)
    x = torch.randint(10, 50, (8, 4))
    b = obj.make_batch(x, torch.arange(8, 16), step=1, global_batch_size=8)
    u = ((b.t_B.double() - 1e-3) / (1 - 1e-3)).sort().values
    gaps = u[1:] - u[:-1]
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-5)


def test_mask_rate_tracks_t():
    obj = _obj()
    x = torch.randint(10, 50, (64, 256))
    b = obj.make_batch(x, torch.arange(64), step=0, global_batch_size=64)
    rate = (b.tokens_BS == MASK).float().mean(1)
    # each row masks Binomial(256, t) positions: standard deviation sqrt(t(1-t)/256) <= 0.031,
    # so no row is 5 of them off and the mean error is about 0.8 of one; a rate of t/2 (or
    # t^2) is off by 0.25 (0.17) on average
    err = (rate - b.t_B).abs()
    assert float(err.max()) < 0.16 and float(err.mean()) < 0.04, (float(err.max()), float(err.mean()))


def test_random_length_is_per_step_and_rate_is_about_right():
    """LLaDA's random-length cut is one decision per optimizer step: every micro-batch of the
    step (whatever rank builds it) gets the same length, drawn uniformly from [1, seq_len];
    about `prob` of the steps are cut; validation batches never are."""
    cuts = [step_random_length(1, s, 128, 0.01) for s in range(4000)]
    frac = sum(c < 128 for c in cuts) / len(cuts)
    assert 0.005 < frac < 0.02
    assert step_random_length(1, 17, 128, 0.0) == 128
    obj = MaskedDiffusion(DiffusionConfig(random_length_prob=0.5), MASK, seed=5)
    x = torch.randint(10, 50, (8, 32))
    lengths = []
    for step in range(200):
        pos = torch.arange(step * 8, step * 8 + 8)
        parts = [obj.make_batch(x[i:i + 2], pos[i:i + 2], step=step, global_batch_size=8) for i in range(0, 8, 2)]
        got = {p.tokens_BS.shape[1] for p in parts} | {p.labels_BS.shape[1] for p in parts}
        assert len(got) == 1, (step, got)  # the same cut for every micro-batch of the step
        lengths.append(got.pop())
        assert obj.make_batch(x[:2], pos[:2], step=step, global_batch_size=8, eval=True).tokens_BS.shape[1] == 32
    cut = [n for n in lengths if n < 32]
    assert 0.35 < len(cut) / len(lengths) < 0.6                      # about half the steps at prob 0.5
    assert min(cut) <= 3 and max(cut) >= 29                          # uniform over [1, seq_len] ...
    assert abs(sum(cut) / len(cut) - 16.5) < 2.5                     # ... with mean (1 + 32) / 2
    assert len(set(lengths[:100])) > 10                              # and drawn anew each step
