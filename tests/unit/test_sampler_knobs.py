"""The sampler's design knobs inside real generation (issue 14): acceptance profile, renoising
profiles (ReMDM), Fast-dLLM's parallel threshold, classifier-free guidance, stop-at-EOS, and
the defaults reproducing the sampler as it was before those knobs existed, bit for bit.

Toy denoisers (tests/unit/test_sampler.py's) keep these fast; the model-backed cache is in
test_fast_dllm.py. Shape legend: B batch, P prompt length, S sequence, V vocab.
"""
from __future__ import annotations

import math

import legacy_block_sampler
import legacy_masked_sampler as legacy
import pytest
import torch
from test_sampler import MASK, EOS, P, V, TinyDenoiser, make_prompt, n_masked_gen, random_table, table_fn

from dlm_megatron.sampling import SamplerConfig, alpha_at, commit_count, generate, renoise_rate


def _hist(model, cfg, batch=2, **kw):
    return generate(model, make_prompt(batch), MASK, cfg, return_history=True, **kw)


# --------------------------------------------------------------------------- defaults = before


LEGACY_GRID = [
    dict(),
    dict(temperature=1.0),
    dict(temperature=0.8, temperature_schedule="cosine", remasking="random"),
    dict(temperature=0.5, temperature_schedule="linear", remasking="margin"),
    dict(remasking="entropy", confidence_threshold=0.2),
    dict(temperature=1.0, renoise_prob=0.3),
    dict(temperature=1.0, renoise_prob=0.1, remasking="random", steps=24),
]


@pytest.mark.parametrize("knobs", LEGACY_GRID)
def test_default_knobs_reproduce_the_previous_sampler_bit_for_bit(knobs):
    """Every existing knob combination, with the new knobs at their defaults (linear acceptance,
    no renoise profile, no cache, no guidance, no threshold, no stop-at-EOS), gives exactly the
    tokens and history of the sampler before issue 14 (tests/unit/legacy_masked_sampler.py)."""
    G = 12
    model = TinyDenoiser(P + G)
    base = dict(steps=12, gen_length=G, block_length=4, seed=7)
    base.update(knobs)
    new_out, new_hist = generate(model, make_prompt(3), MASK, SamplerConfig(**base), eos_id=EOS, return_history=True)
    old_out, old_hist = legacy.generate(model, make_prompt(3), MASK, legacy.SamplerConfig(**base), eos_id=EOS,
                                        return_history=True)
    assert torch.equal(new_out, old_out)
    assert len(new_hist) == len(old_hist) and all(torch.equal(a, b) for a, b in zip(new_hist, old_hist))


@pytest.mark.parametrize("knobs", [dict(), dict(temperature=1.0, renoise_prob=0.2), dict(temperature=0.7, remasking="margin")])
def test_block_sampler_defaults_reproduce_the_previous_block_sampler(knobs):
    """Same for the block-diffusion sampler (which now shares denoise_step) on a real model."""
    from test_fast_dllm import build_model_for

    model = build_model_for("block")
    prompt = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(3))
    base = dict(steps=12, gen_length=12, block_length=4, seed=5, **knobs)
    from dlm_megatron.sampling import generate_blocks

    got = generate_blocks(model, prompt, 63, SamplerConfig(**base), vocab_size=64, eos_id=2)
    want = legacy_block_sampler.generate_blocks(model, prompt, 63, legacy.SamplerConfig(**base), vocab_size=64, eos_id=2)
    assert torch.equal(got, want)


def test_renoise_profile_constant_is_the_renoise_prob_alias():
    G = 12
    model = TinyDenoiser(P + G)
    a = generate(model, make_prompt(), MASK, SamplerConfig(steps=12, gen_length=G, block_length=G, temperature=1.0,
                                                          renoise_prob=0.25, seed=2))
    b = generate(model, make_prompt(), MASK, SamplerConfig(steps=12, gen_length=G, block_length=G, temperature=1.0,
                                                          renoise_profile="constant", renoise_eta=0.25, seed=2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="renoise_prob is an alias"):
        SamplerConfig(renoise_prob=0.1, renoise_profile="cap")


# --------------------------------------------------------------------------- acceptance profile


def _commits(hist):
    return [int(((a[:, P:] == MASK) & (b[:, P:] != MASK)).sum()) for a, b in zip(hist[:-1], hist[1:])]


@pytest.mark.parametrize("profile", ["linear", "cosine"])
def test_committed_count_after_each_step_follows_the_acceptance_profile(profile):
    """One block of M = 64 masked positions, K = 8 steps, one row: the committed fraction after
    step n follows F(n/K), linear n/K and cosine 1 - cos(pi n / 2K). Cosine: exactly
    ceil(M F(n/K)) positions after step n. Linear: LLaDA's even split, ceil(m / (K - n)) of
    the m still masked (here exactly M n / K)."""
    M, K = 64, 8
    cfg = SamplerConfig(steps=K, gen_length=M, block_length=M, acceptance_profile=profile)
    _, hist = generate(table_fn(random_table(P + M)), make_prompt(1), MASK, cfg, return_history=True)
    per_step = _commits(hist)
    assert len(per_step) == K and sum(per_step) == M
    F = (lambda u: u) if profile == "linear" else (lambda u: 1 - math.cos(math.pi * u / 2))
    done = 0
    for n, c in enumerate(per_step, 1):
        if profile == "linear":
            assert c == math.ceil((M - done) / (K - n + 1))
        done += c
        assert done == math.ceil(M * F(n / K) - 1e-9), (profile, n, done, M * F(n / K))
    if profile == "linear":
        assert per_step == [8] * 8
    else:  # MaskGIT's cosine: few commits early, many late
        assert per_step[0] <= 2 and per_step[-1] >= 10, per_step


def test_cosine_profile_on_uneven_counts():
    """M = 10 over K = 4 (and M = 7 over K = 7): ceil(M F(n/K)) committed after step n."""
    for M, K in ((10, 4), (7, 7), (30, 6)):
        cfg = SamplerConfig(steps=K, gen_length=M, block_length=M, acceptance_profile="cosine")
        _, hist = generate(table_fn(random_table(P + M)), make_prompt(2), MASK, cfg, return_history=True)
        done = [int((h[0, P:] != MASK).sum()) for h in hist]
        assert done == [math.ceil(M * (1 - math.cos(math.pi * n / (2 * K))) - 1e-9) for n in range(K + 1)], (M, K, done)


def test_commit_count_helper_matches_linear_closed_form():
    cfg = SamplerConfig(steps=7, gen_length=7, block_length=7)
    for m in range(0, 40):
        for i in range(7):
            assert int(commit_count(torch.tensor([m]), i, 7, cfg)[0]) == math.ceil(m / (7 - i))


# --------------------------------------------------------------------------- renoising profiles


def _renoise_counts(cfg, B=96, G=32):
    """Per step j >= 1: (committed tokens before the step, how many of them the step re-masked)."""
    seen = []
    model = TinyDenoiser(P + G)

    def fn(x):
        seen.append(x.clone())
        return model(x)

    _, hist = generate(fn, make_prompt(B), MASK, cfg, return_history=True)
    rows = []
    for j in range(1, len(seen)):
        before = hist[j][:, P:] != MASK
        remasked = before & (seen[j][:, P:] == MASK)
        rows.append((int(before.sum()), int(remasked.sum())))
    return rows


@pytest.mark.parametrize("profile,eta", [("constant", 0.2), ("cap", 0.15), ("rescale", 0.5), ("loop", 0.3)])
def test_renoise_rate_matches_the_profile_within_sampling_error(profile, eta):
    """Inside generation, at each step every committed token is re-masked with probability
    sigma_n = renoise_rate(n): constant eta; cap min(eta, (1-a_s)/a_t); rescale eta * min(1,
    (1-a_s)/a_t); loop eta for t_off < t <= t_on, 0 elsewhere. The observed count over many
    steps and rows matches sum(sigma_n * trials_n) within 4 standard errors, and steps with
    sigma_n = 0 re-mask nothing."""
    G = 32
    cfg = SamplerConfig(steps=G, gen_length=G, block_length=G, temperature=1.0, renoise_profile=profile,
                        renoise_eta=eta, renoise_t_on=0.7, renoise_t_off=0.2, seed=11)
    rows = _renoise_counts(cfg)

    def sigma(j):  # ReMDM's schedules written out for the linear profile: alpha_t = j/G, alpha_s = (j+1)/G
        a_t, a_s = j / G, (j + 1) / G
        bound = min(1.0, (1 - a_s) / a_t)
        return {"constant": eta, "cap": min(eta, (1 - a_s) / a_t), "rescale": eta * bound,
                "loop": eta if (0.2 < 1 - j / G <= 0.7 and j < G - 1) else 0.0}[profile]

    sig = [sigma(j) for j in range(1, len(rows) + 1)]
    assert sig == pytest.approx([renoise_rate(j, G, cfg) for j in range(1, len(rows) + 1)])
    expected = sum(s * n for s, (n, _) in zip(sig, rows))
    var = sum(s * (1 - s) * n for s, (n, _) in zip(sig, rows))
    observed = sum(r for _, r in rows)
    assert expected > 200, expected
    assert abs(observed - expected) < 4 * math.sqrt(var), (profile, observed, expected, math.sqrt(var))
    for s, (n, r) in zip(sig, rows):
        if s == 0.0:
            assert r == 0
    if profile == "cap":
        assert any(s < eta for s in sig) and any(s == eta for s in sig)  # the cap binds late
    if profile == "loop":
        on = [j for j, s in enumerate(sig, 1) if s > 0]
        assert on and all(0.2 < 1 - j / G <= 0.7 for j in on)


def test_remdm_bounds_and_loop_alpha():
    cfg = SamplerConfig(steps=10, gen_length=10, block_length=10, renoise_profile="cap", renoise_eta=0.9)
    for i in range(1, 10):  # cap: sigma <= (1 - alpha_s) / alpha_t keeps the unmasking probability >= 0
        a_t, a_s = (i / 10), (i + 1) / 10
        assert renoise_rate(i, 10, cfg) == pytest.approx(min(0.9, (1 - a_s) / a_t))
    loop = SamplerConfig(renoise_profile="loop", renoise_t_on=0.6, renoise_t_off=0.1, renoise_alpha_on=0.8)
    assert alpha_at(1.0, loop) == 0.0 and alpha_at(0.6, loop) == pytest.approx(0.8)
    assert alpha_at(0.3, loop) == 0.8 and alpha_at(0.0, loop) == 1.0
    assert alpha_at(0.8, loop) == pytest.approx(0.8 * 0.2 / 0.4)


def test_loop_phase_holds_the_committed_count():
    """ReMDM-loop: during the loop the number of committed tokens stays at alpha_on * M (each
    step re-commits as many as it re-masked); the block still ends fully decoded."""
    G = 40
    cfg = SamplerConfig(steps=20, gen_length=G, block_length=G, temperature=1.0, renoise_profile="loop", renoise_eta=0.3,
                        renoise_t_on=0.6, renoise_t_off=0.2, renoise_alpha_on=0.5, seed=4)
    out, hist = _hist(TinyDenoiser(P + G), cfg, batch=4)
    committed = [int((h[:, P:] != MASK).sum(dim=1)[0]) for h in hist]
    loop_steps = [i for i in range(20) if 0.2 < 1 - i / 20 <= 0.6]
    held = [committed[i + 1] for i in loop_steps]
    assert set(held) == {20}, committed  # ceil(alpha_on * M), re-committed after every re-mask
    assert committed[loop_steps[0]] == 20  # phase 1 reached alpha_on at t_on
    assert int(n_masked_gen(out).sum()) == 0


# --------------------------------------------------------------------------- Fast-dLLM threshold


def test_parallel_threshold_is_fast_dllms_policy():
    """Every masked position whose confidence reaches tau is committed, plus the most confident
    one when none does, whatever the step schedule says (steps=1 here: the block still takes as
    many steps as it needs)."""
    G = 16
    table = random_table(P + G, scale=4.0, seed=3)
    tau = 0.5
    cfg = SamplerConfig(steps=1, gen_length=G, block_length=G, parallel_threshold=tau)
    _, hist = generate(table_fn(table), make_prompt(1), MASK, cfg, return_history=True)
    conf = torch.softmax(table[P:].double().index_fill(-1, torch.tensor([MASK]), -math.inf), -1).max(-1).values
    still = torch.ones(G, dtype=torch.bool)
    for a, b in zip(hist[:-1], hist[1:]):
        new = (a[0, P:] == MASK) & (b[0, P:] != MASK)
        want = still & (conf >= tau)
        if not bool(want.any()):
            want = torch.zeros(G, dtype=torch.bool)
            want[torch.where(still, conf, torch.tensor(-1.0, dtype=conf.dtype)).argmax()] = True
        assert torch.equal(new, want)
        still &= ~new
    assert len(hist) - 1 > 1 and not bool(still.any())
    # confidence_threshold keeps the schedule: with steps=1 the single step commits everything
    one = generate(table_fn(table), make_prompt(1), MASK, SamplerConfig(steps=1, gen_length=G, block_length=G,
                                                                       confidence_threshold=tau), return_history=True)[1]
    assert len(one) == 2


# --------------------------------------------------------------------------- guidance, EOS, config


def test_cfg_unconditional_row_of_a_shifted_model_keeps_token_0():
    """Shifted models train with token 0 clean (even under prompt_dropout): guidance masks
    the rest of the prompt only."""
    model = TinyDenoiser(P + 4)
    seen = []

    def fn(x):
        seen.append(x.clone())
        return model(x)

    for shift in (False, True):
        fn.shift = shift
        seen.clear()
        generate(fn, make_prompt(), MASK, SamplerConfig(steps=4, gen_length=4, block_length=4, cfg_scale=1.0))
        unc = seen[0][2:, :P]
        assert torch.equal(unc[:, 1:], torch.full_like(unc[:, 1:], MASK))
        assert torch.equal(unc[:, 0], make_prompt()[:, 0] if shift else torch.full_like(unc[:, 0], MASK)), shift


def test_cfg_scale_zero_is_plain_sampling_and_positive_follows_the_formula():
    G = 8
    model = TinyDenoiser(P + G)
    plain = generate(model, make_prompt(), MASK, SamplerConfig(steps=8, gen_length=G, block_length=4, temperature=1.0))
    calls = []

    def spy(x):
        calls.append(x.clone())
        return model(x)

    zero = generate(spy, make_prompt(), MASK, SamplerConfig(steps=8, gen_length=G, block_length=4, temperature=1.0, cfg_scale=0.0))
    assert torch.equal(zero, plain) and all(c.shape[0] == 2 for c in calls)  # W = 0: no unconditional pass
    seen = []
    W = 1.5

    def capture(x):
        out = model(x)
        seen.append((x.clone(), out))
        return out

    cfg = SamplerConfig(steps=8, gen_length=G, block_length=4, cfg_scale=W)
    _, hist = generate(capture, make_prompt(), MASK, cfg, return_history=True)
    x, _ = seen[0]
    assert x.shape[0] == 4 and torch.equal(x[2:, :P], torch.full((2, P), MASK)) and torch.equal(x[2:, P:], x[:2, P:])
    # the committed tokens are argmax of u + (1 + W)(c - u), c and u from two separate forwards
    for step, (a, b) in enumerate(zip(hist[:-1], hist[1:])):
        c = model(a)
        u = model(a.index_fill(1, torch.arange(P), MASK))
        guided = u + (1 + W) * (c - u)
        guided[..., MASK] = -math.inf
        new = (a == MASK) & (b != MASK)
        assert torch.equal(b[new], guided.argmax(-1)[new]), step
    # and differs from unguided greedy decoding
    assert not torch.equal(hist[-1], generate(model, make_prompt(), MASK, SamplerConfig(steps=8, gen_length=G, block_length=4)))


def test_stop_at_eos_fills_the_rest_of_the_block():
    G = 16
    table = random_table(P + G)
    table[:, EOS] = -10.0
    table[P + 5, EOS] = 50.0  # EOS is by far the most confident prediction at generated position 5
    cfg = SamplerConfig(steps=16, gen_length=G, block_length=8, stop_at_eos=True)
    out, hist = generate(table_fn(table), make_prompt(1), MASK, cfg, eos_id=EOS, return_history=True)
    assert hist[1][0, P + 5] == EOS and bool((hist[1][0, P + 6: P + 8] == EOS).all())
    assert bool((out[0, P + 5:] == EOS).all())
    # block 0 needed 6 steps (1 for EOS + fill, 5 for P..P+4); block 1 was filled without a step
    assert len(hist) == 7 and bool((hist[-1][0, P + 8:] == MASK).all())
    off = generate(table_fn(table), make_prompt(1), MASK, SamplerConfig(steps=16, gen_length=G, block_length=8), eos_id=EOS)
    assert not bool((off[0, P + 6: P + 8] == EOS).all())
    with pytest.raises(ValueError, match="eos_id"):
        generate(table_fn(table), make_prompt(1), MASK, cfg)


def test_block_sampler_stop_at_eos_fills_after_generated_eos_only():
    """Block sampler on a real model, block size 4, prompt of 6: the first block [4, 8) holds
    prompt positions 4 and 5. A generated EOS fills the rest of its block; an EOS in the
    prompt part of that block does not (the model never proposes EOS there: suppressed)."""
    from test_fast_dllm import build_model_for

    from dlm_megatron.sampling import generate_blocks

    model = build_model_for("block")
    prompt = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(3))
    cfg = dict(steps=16, gen_length=16, block_length=4, seed=5)
    plain = generate_blocks(model, prompt, 63, SamplerConfig(**cfg), vocab_size=64)
    # EOS := the token committed at position 6; with stop_at_eos the block [4, 8) must end in it
    eos = int(plain[0, 6])
    out = generate_blocks(model, prompt, 63, SamplerConfig(**cfg, stop_at_eos=True), vocab_size=64, eos_id=eos)
    gen = out[:, 6:]
    first = (gen == eos).long().argmax(dim=1)
    for row, f in enumerate(first.tolist()):
        if bool((gen[row] == eos).any()):
            end = 6 + f + (-(6 + f + 1) % 4) + 1  # end of the EOS's own block
            assert bool((out[row, 6 + f:end] == eos).all()), (row, out[row])
    assert not torch.equal(out, plain)
    # an EOS in the prompt's part of a block is not a generated EOS
    with_eos = prompt.clone()
    with_eos[:, 4] = 2
    a = generate_blocks(model, with_eos, 63, SamplerConfig(**cfg, stop_at_eos=True), vocab_size=64, eos_id=2,
                        suppress_ids=[2])
    b = generate_blocks(model, with_eos, 63, SamplerConfig(**cfg), vocab_size=64, eos_id=2, suppress_ids=[2])
    assert torch.equal(a, b) and not bool((a[:, 6:8] == 2).any())


@pytest.mark.parametrize("kwargs,field", [
    (dict(acceptance_profile="square"), "acceptance_profile"),
    (dict(renoise_profile="always"), "renoise_profile"),
    (dict(renoise_profile="cap", renoise_eta=1.5), "renoise_eta"),
    (dict(renoise_profile="loop", renoise_t_on=0.1, renoise_t_off=0.3), "renoise_t_off"),
    (dict(renoise_alpha_on=1.0), "renoise_alpha_on"),
    (dict(cache="full"), "cache"),
    (dict(parallel_threshold=1.5), "parallel_threshold"),
    (dict(parallel_threshold=0.9, renoise_profile="constant"), "parallel_threshold"),
    (dict(parallel_threshold=0.9, confidence_threshold=0.5), "parallel_threshold"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
])
def test_new_knobs_validate(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**kwargs)


def test_cache_needs_a_model_backed_logits_function():
    with pytest.raises(ValueError, match="model_logits_fn"):
        generate(table_fn(random_table(P + 4)), make_prompt(), MASK, SamplerConfig(steps=4, gen_length=4, block_length=4,
                                                                                   cache="dual"))


# --------------------------------------------------------------------------- on a real megatron-core model


def _real_prompt(B=2, P=6):
    return torch.randint(3, 60, (B, P), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("objective", ["masked", "block"])
def test_acceptance_profile_counts_inside_real_generation(objective, monkeypatch):
    """On a megatron-core denoiser, through the masked sampler and the block sampler (one block
    of M = 16 positions, K = 8 steps): after step n, ceil(M F(n/K)) positions are committed,
    cosine F(u) = 1 - cos(pi u / 2) and linear F(u) = u. The block sampler is observed through
    the commits its steps return (the step loop both samplers share)."""
    from test_fast_dllm import build_model_for

    from dlm_megatron.sampling import masked as masked_mod
    from dlm_megatron.sampling import generate_blocks, model_logits_fn

    model = build_model_for(objective)
    M, K = 16, 8
    for profile in ("linear", "cosine"):
        cfg = SamplerConfig(steps=K, gen_length=M, block_length=M, acceptance_profile=profile, temperature=0.5)
        if objective == "masked":
            _, hist = generate(model_logits_fn(model, 64), _real_prompt(), 63, cfg, return_history=True)
            done = [int((x[0, 6:] != 63).sum()) for x in hist]
        else:
            done, real_step = [0], masked_mod.denoise_step

            def spy(*a, **kw):
                x0, commit = real_step(*a, **kw)
                done.append(done[-1] + int(commit[0].sum()))
                return x0, commit

            monkeypatch.setattr(masked_mod, "denoise_step", spy)
            generate_blocks(model, _real_prompt(P=16), 63, cfg, vocab_size=64)  # block [16, 32) on the grid
            monkeypatch.setattr(masked_mod, "denoise_step", real_step)
        F = (lambda u: u) if profile == "linear" else (lambda u: 1 - math.cos(math.pi * u / 2))
        want = [math.ceil(M * F(n / K) - 1e-9) for n in range(K + 1)]
        assert done == want, (objective, profile, done, want)
        assert profile == "linear" or want != [2 * n for n in range(K + 1)]  # the profiles differ here


def test_cfg_logits_follow_the_formula_against_two_separate_forwards(monkeypatch):
    """On a megatron-core denoiser: the logits every guided step works on equal
    u + (1 + W)(c - u) with c = a forward of the sequence and u = a separate forward of the
    sequence with its prompt masked (1e-5: float32 logits of order 10, the batched forward
    differs from the single one by rounding only); W = 0 is plain sampling bit for bit."""
    from test_fast_dllm import build_model_for

    from dlm_megatron.sampling import masked as masked_mod
    from dlm_megatron.sampling import model_logits_fn

    model = build_model_for("masked")
    fn = model_logits_fn(model, 64)
    P, W = 6, 1.5
    steps = []
    real_step = masked_mod.denoise_step

    def spy(logits_BLV, masked_BL, i, k, cfg, *a, **kw):
        steps.append(logits_BLV.clone())
        return real_step(logits_BLV, masked_BL, i, k, cfg, *a, **kw)

    monkeypatch.setattr(masked_mod, "denoise_step", spy)
    cfg = SamplerConfig(steps=8, gen_length=8, block_length=4, cfg_scale=W, temperature=0.8, seed=1)
    _, hist = generate(fn, _real_prompt(), 63, cfg, return_history=True)
    assert len(steps) == len(hist) - 1 == 8
    for j, (x, got) in enumerate(zip(hist[:-1], steps)):
        lo = P + (j // 4) * 4
        c = fn(x)[:, lo:lo + 4]
        u = fn(x.index_fill(1, torch.arange(P), 63))[:, lo:lo + 4]
        assert (got - (u + (1 + W) * (c - u))).abs().max() < 1e-5, j
        assert (c - u).abs().max() > 0.1  # the prompt matters: guidance is not a no-op here
    monkeypatch.setattr(masked_mod, "denoise_step", real_step)
    plain = SamplerConfig(steps=8, gen_length=8, block_length=4, temperature=0.8, seed=1)
    zero = SamplerConfig(steps=8, gen_length=8, block_length=4, temperature=0.8, seed=1, cfg_scale=0.0)
    assert torch.equal(generate(fn, _real_prompt(), 63, zero), legacy.generate(fn, _real_prompt(), 63, legacy.SamplerConfig(
        steps=8, gen_length=8, block_length=4, temperature=0.8, seed=1)))
    assert torch.equal(generate(fn, _real_prompt(), 63, zero), generate(fn, _real_prompt(), 63, plain))
