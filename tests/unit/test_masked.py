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
    u = md.stratified_uniform(0.37, 8)
    assert torch.allclose(torch.sort(u).values, torch.remainder(0.37 + torch.arange(8) / 8, 1).sort().values.double())
    t = md.t_from_uniform(torch.tensor([0.0, 0.999999]), 1e-3)
    assert t[0].item() == pytest.approx(1e-3) and t[1].item() < 1.0


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
    assert torch.corrcoef(torch.stack([rate, b.t_B]))[0, 1] > 0.95


def test_random_length_is_per_step_and_rate_is_about_right():
    cuts = [step_random_length(1, s, 128, 0.01) for s in range(4000)]
    frac = sum(c < 128 for c in cuts) / len(cuts)
    assert 0.005 < frac < 0.02
    assert step_random_length(1, 17, 128, 0.0) == 128
    assert step_random_length(1, 17, 128, 1.0) == step_random_length(1, 17, 128, 1.0) <= 128
