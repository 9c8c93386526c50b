"""Unit tests for the masked-diffusion sampler (toy, deterministic denoisers).

Shape legend: B batch, P prompt length, S sequence length, V vocab.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor

from dlm_megatron.sampling import (
    SamplerConfig,
    confidence,
    generate,
    num_transfer_tokens,
    sample_tokens,
    select_top,
    temperature_at,
)

V = 16
MASK = V - 1
EOS = 2
P = 3


def make_prompt(batch: int = 2) -> Tensor:
    """[B, P] prompt that avoids MASK and EOS."""
    return (torch.arange(batch * P).view(batch, P) % 8 + 4).long()


def table_fn(table: Tensor) -> Callable[[Tensor], Tensor]:
    """Denoiser whose logits depend only on position: table [S, V] -> fn([B, S]) -> [B, S, V]."""

    def fn(x: Tensor) -> Tensor:
        return table[None].expand(x.shape[0], -1, -1).clone()

    return fn


def random_table(seq_len: int, scale: float = 3.0, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(seq_len, V, generator=g) * scale


class TinyDenoiser(torch.nn.Module):
    """Token-dependent toy model: each position sees its own and its left neighbour's embedding."""

    def __init__(self, seq_len: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 8)
        self.pos = torch.nn.Parameter(torch.randn(seq_len, 8))
        self.out = torch.nn.Linear(16, V)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) + self.pos
        left = torch.roll(h, 1, dims=1)
        return self.out(torch.cat([h, left], dim=-1)) * 3.0


def n_masked_gen(x: Tensor) -> Tensor:
    """[B, S] -> [B] number of masks in the generation region."""
    return (x[:, P:] == MASK).sum(dim=1)


def commits_per_step(history: list[Tensor]) -> list[int]:
    """Newly committed tokens (summed over batch) at each step, assuming no renoising."""
    return [int(((a == MASK) & (b != MASK)).sum()) for a, b in zip(history[:-1], history[1:])]


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def test_num_transfer_tokens_sums_and_is_even() -> None:
    counts = torch.tensor([0, 1, 5, 10, 32, 33])
    out = num_transfer_tokens(counts, 4)
    assert out.shape == (6, 4)
    assert torch.equal(out.sum(dim=1), counts)
    assert bool(((out.max(dim=1).values - out.min(dim=1).values) <= 1).all())
    assert bool((out[:, :-1] >= out[:, 1:]).all())  # remainder goes first
    assert out[3].tolist() == [3, 3, 2, 2]


def test_num_transfer_tokens_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        num_transfer_tokens(torch.tensor([3]), 0)


def test_temperature_schedules() -> None:
    const = SamplerConfig(temperature=0.8)
    lin = SamplerConfig(temperature=0.8, temperature_schedule="linear")
    cos = SamplerConfig(temperature=0.8, temperature_schedule="cosine")
    assert temperature_at(0.3, const) == 0.8
    assert temperature_at(0.5, lin) == pytest.approx(0.4)
    for cfg in (lin, cos):
        assert temperature_at(1.0, cfg) == pytest.approx(0.8)
        assert temperature_at(0.0, cfg) == pytest.approx(0.0)
        ts = [temperature_at(t / 10, cfg) for t in range(11)]
        assert ts == sorted(ts)


def test_confidence_rules() -> None:
    probs = torch.tensor([[[0.5, 0.5, 0.0], [0.4, 0.1, 0.5]]], dtype=torch.float64)
    x0 = torch.tensor([[0, 2]])
    assert confidence(probs, x0, "low_confidence").tolist() == [[0.5, 0.5]]
    assert confidence(probs, x0, "margin")[0].tolist() == pytest.approx([0.0, 0.1])
    ent = confidence(probs, x0, "entropy")[0]
    assert ent[0].item() == pytest.approx(-math.log(2))
    assert ent[1].item() == pytest.approx(sum(p * math.log(p) for p in (0.4, 0.1, 0.5)))
    g = torch.Generator().manual_seed(0)
    r = confidence(probs, x0, "random", g)
    assert r.shape == (1, 2) and bool(((r >= 0) & (r < 1)).all())
    # random: the generator's uniforms, whatever the model believes (other probabilities and
    # candidates, same generator state -> same scores; another state -> other scores)
    other = confidence(probs.flip(-1), torch.tensor([[1, 0]]), "random", torch.Generator().manual_seed(0))
    assert torch.equal(other, r) and not torch.equal(confidence(probs, x0, "random", torch.Generator().manual_seed(1)), r)
    with pytest.raises(ValueError):
        confidence(probs, x0, "nope")


def test_select_top_respects_candidates_and_ties() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    cand = torch.tensor([[False, True, True, True], [True, True, True, True]])
    out = select_top(scores, cand, torch.tensor([2, 2]))
    assert out.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_gumbel_sampling_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0]).expand(1, 20000, 3)
    g = torch.Generator().manual_seed(0)
    x0 = sample_tokens(logits, 2.0, g)
    freq = torch.bincount(x0.flatten(), minlength=3).double() / x0.numel()
    expected = torch.softmax(logits[0, 0].double() / 2.0, dim=-1)
    assert torch.allclose(freq, expected, atol=0.015)
    assert torch.equal(sample_tokens(logits[:, :5], 0.0), torch.zeros(1, 5, dtype=torch.long))


# --------------------------------------------------------------------------- #
# Config validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gen_length": 30, "block_length": 8}, "block_length"),
        ({"gen_length": 32, "block_length": 8, "steps": 6}, "steps"),
        ({"steps": 0}, "steps"),
        ({"gen_length": 0}, "gen_length"),
        ({"block_length": 0}, "block_length"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature_schedule": "exp"}, "temperature_schedule"),
        ({"remasking": "topk"}, "remasking"),
        ({"renoise_prob": 1.0}, "renoise_prob"),
        ({"renoise_prob": -0.1}, "renoise_prob"),
        ({"confidence_threshold": math.nan}, "confidence_threshold"),
    ],
)
def test_invalid_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**kwargs)


def test_generate_revalidates_mutated_config() -> None:
    cfg = SamplerConfig(steps=4, gen_length=4, block_length=4)
    cfg.block_length = 3
    with pytest.raises(ValueError, match="block_length"):
        generate(table_fn(random_table(P + 4)), make_prompt(), MASK, cfg)


def test_bad_logits_shape_raises() -> None:
    cfg = SamplerConfig(steps=4, gen_length=4, block_length=4)
    with pytest.raises(ValueError, match="logits_fn"):
        generate(lambda x: torch.zeros(x.shape[0], x.shape[1] + 1, V), make_prompt(), MASK, cfg)


# --------------------------------------------------------------------------- #
# Generation knobs
# --------------------------------------------------------------------------- #


def test_one_token_per_step_when_steps_equal_gen_length() -> None:
    G = 8
    cfg = SamplerConfig(steps=G, gen_length=G, block_length=G)
    prompt = make_prompt(batch=2)
    out, hist = generate(table_fn(random_table(P + G)), prompt, MASK, cfg, return_history=True)
    assert len(hist) == G + 1
    assert commits_per_step(hist) == [2] * G  # one per row per step
    assert int(n_masked_gen(out).sum()) == 0


def test_single_step_commits_everything() -> None:
    G = 8
    cfg = SamplerConfig(steps=1, gen_length=G, block_length=G)
    out, hist = generate(table_fn(random_table(P + G)), make_prompt(), MASK, cfg, return_history=True)
    assert len(hist) == 2
    assert int(n_masked_gen(out).sum()) == 0


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_no_masks_left_and_prompt_unchanged(remasking: str, schedule: str) -> None:
    G = 16
    cfg = SamplerConfig(
        steps=8, gen_length=G, block_length=4, temperature=0.7,
        temperature_schedule=schedule, remasking=remasking,
    )
    prompt = make_prompt(batch=3)
    out = generate(TinyDenoiser(P + G), prompt, MASK, cfg)
    assert out.shape == (3, P + G) and out.dtype == torch.long
    assert torch.equal(out[:, :P], prompt)
    assert int(n_masked_gen(out).sum()) == 0


def test_more_steps_than_tokens_finishes_early() -> None:
    G = 4
    cfg = SamplerConfig(steps=16, gen_length=G, block_length=G)
    calls: list[int] = []
    fn = table_fn(random_table(P + G))
    out = generate(lambda x: (calls.append(1), fn(x))[1], make_prompt(), MASK, cfg)
    assert len(calls) == G  # profile is [1,1,1,1,0,...]: empty steps skip the forward
    assert int(n_masked_gen(out).sum()) == 0


def test_suppressed_and_mask_ids_never_sampled() -> None:
    G = 8
    table = random_table(P + G)
    table[:, MASK] = 100.0  # model loves the mask token...
    table[:, 7] = 50.0  # ...and token 7
    cfg = SamplerConfig(steps=4, gen_length=G, block_length=G, temperature=1.0)
    out = generate(table_fn(table), make_prompt(), MASK, cfg, suppress_ids=[7])
    gen = out[:, P:]
    assert not bool((gen == MASK).any()) and not bool((gen == 7).any())


def test_renoise_zero_never_remasks() -> None:
    G = 12
    seen: list[Tensor] = []
    model = TinyDenoiser(P + G)

    def fn(x: Tensor) -> Tensor:
        seen.append(x.clone())
        return model(x)

    cfg = SamplerConfig(steps=12, gen_length=G, block_length=4, temperature=1.0, renoise_prob=0.0)
    out, hist = generate(fn, make_prompt(), MASK, cfg, return_history=True)
    for a, b in zip(hist[:-1], hist[1:]):
        committed = a != MASK
        assert torch.equal(b[committed], a[committed])
    assert int(n_masked_gen(out).sum()) == 0


def test_renoise_remasks_sometimes_but_finishes() -> None:
    G = 16
    seen: list[Tensor] = []
    model = TinyDenoiser(P + G)

    def fn(x: Tensor) -> Tensor:
        seen.append(x.clone())
        return model(x)

    prompt = make_prompt(batch=2)
    cfg = SamplerConfig(steps=16, gen_length=G, block_length=8, temperature=1.0, renoise_prob=0.3)
    out = generate(fn, prompt, MASK, cfg)
    # The denoiser's inputs reveal re-masking: a position unmasked in one call
    # is masked again in the next.
    remasked = sum(int(((a != MASK) & (b == MASK)).sum()) for a, b in zip(seen[:-1], seen[1:]))
    assert remasked > 0
    assert torch.equal(out[:, :P], prompt)
    assert int(n_masked_gen(out).sum()) == 0


def test_confidence_threshold_parallel_decoding() -> None:
    G = 8
    table = torch.zeros(P + G, V)  # uniform -> confidence 1/(V-1) after suppressing MASK
    table[P : P + 4, 5] = 30.0  # first four generated positions are near-certain
    cfg = SamplerConfig(steps=G, gen_length=G, block_length=G, confidence_threshold=0.9)
    out, hist = generate(table_fn(table), make_prompt(batch=1), MASK, cfg, return_history=True)
    assert commits_per_step(hist) == [4, 1, 1, 1, 1]  # block done early: 5 forwards, not 8
    assert out[0, P : P + 4].tolist() == [5] * 4
    assert int(n_masked_gen(out).sum()) == 0


def test_confidence_threshold_never_confident_commits_one_per_step() -> None:
    G = 8
    cfg = SamplerConfig(steps=G, gen_length=G, block_length=G, confidence_threshold=0.99)
    fn = table_fn(torch.zeros(P + G, V))
    out, hist = generate(fn, make_prompt(batch=1), MASK, cfg, return_history=True)
    assert commits_per_step(hist) == [1] * G
    # Few steps: the linear profile is the floor, so the block still finishes.
    cfg2 = SamplerConfig(steps=2, gen_length=G, block_length=G, confidence_threshold=0.99)
    out2, hist2 = generate(fn, make_prompt(batch=1), MASK, cfg2, return_history=True)
    assert commits_per_step(hist2) == [4, 4]
    assert int(n_masked_gen(out2).sum()) == 0


def test_determinism_and_seed_sensitivity() -> None:
    G = 32
    fn = table_fn(random_table(P + G, scale=0.5))
    prompt = make_prompt(batch=2)
    kw = dict(steps=8, gen_length=G, block_length=8, temperature=1.0, remasking="random")
    a = generate(fn, prompt, MASK, SamplerConfig(seed=3, **kw))
    b = generate(fn, prompt, MASK, SamplerConfig(seed=3, **kw))
    c = generate(fn, prompt, MASK, SamplerConfig(seed=4, **kw))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_is_seed_independent() -> None:
    G = 8
    fn = table_fn(random_table(P + G))
    kw = dict(steps=4, gen_length=G, block_length=G)
    a = generate(fn, make_prompt(), MASK, SamplerConfig(seed=0, **kw))
    b = generate(fn, make_prompt(), MASK, SamplerConfig(seed=1, **kw))
    assert torch.equal(a, b)
    assert torch.equal(a[:, P:], fn(a)[:, P:, :MASK].argmax(-1))


def test_greedy_low_confidence_commits_most_confident_first() -> None:
    G = 4
    table = torch.zeros(P + G, V)
    peaks = [2.0, 8.0, 4.0, 6.0]  # commit order should be positions 1, 3, 2, 0
    for j, h in enumerate(peaks):
        table[P + j, 9] = h
    cfg = SamplerConfig(steps=G, gen_length=G, block_length=G)
    _, hist = generate(table_fn(table), make_prompt(batch=1), MASK, cfg, return_history=True)
    order = [int(((a != b)[0, P:]).nonzero()) for a, b in zip(hist[:-1], hist[1:])]
    assert order == [1, 3, 2, 0]


def test_margin_and_entropy_order_differ_from_low_confidence() -> None:
    G = 2
    # Position 0: two tied top tokens (p1 high-ish, margin 0, low entropy).
    # Position 1: one clear winner with a lower top probability but big margin.
    table = torch.full((P + G, V), -1e4)
    table[P, 0] = table[P, 1] = 0.0
    table[P + 1, 0] = math.log(0.4)
    table[P + 1, 1 : 1 + 6] = math.log(0.1)

    def first_committed(rule: str) -> int:
        cfg = SamplerConfig(steps=G, gen_length=G, block_length=G, remasking=rule)
        _, hist = generate(table_fn(table), make_prompt(batch=1), MASK, cfg, return_history=True)
        return int(((hist[0] != hist[1])[0, P:]).nonzero())

    assert first_committed("low_confidence") == 0  # 0.5 > 0.4
    assert first_committed("margin") == 1  # 0.3 > 0.0
    assert first_committed("entropy") == 0  # H = log 2 < H(0.4, 6 x 0.1)


def test_blocks_fill_left_to_right() -> None:
    G, BL, steps = 16, 4, 8
    table = random_table(P + G)
    table[P + BL :, 3] = 50.0  # later blocks are far more confident: tempting to jump ahead
    cfg = SamplerConfig(steps=steps, gen_length=G, block_length=BL, temperature=0.5)
    out, hist = generate(table_fn(table), make_prompt(), MASK, cfg, return_history=True)
    k = steps // (G // BL)
    assert len(hist) == steps + 1
    for step, (a, b) in enumerate(zip(hist[:-1], hist[1:])):
        blk = step // k
        lo, hi = P + blk * BL, P + (blk + 1) * BL
        new = (a == MASK) & (b != MASK)
        assert not bool(new[:, :lo].any()) and not bool(new[:, hi:].any())
        assert bool((b[:, hi:] == MASK).all())  # nothing to the right yet
        if (step + 1) % k == 0:
            assert not bool((b[:, lo:hi] == MASK).any())  # block finished before the next starts
    assert int(n_masked_gen(out).sum()) == 0


def test_eos_fills_remaining_blocks_and_stops_early() -> None:
    G, BL = 12, 4
    table = random_table(P + G)
    table[P + 1, EOS] = 50.0
    calls: list[int] = []
    fn = table_fn(table)
    cfg = SamplerConfig(steps=6, gen_length=G, block_length=BL)
    out = generate(lambda x: (calls.append(1), fn(x))[1], make_prompt(), MASK, cfg, eos_id=EOS)
    assert len(calls) == 2  # only the first block was sampled
    assert bool((out[:, P + BL :] == EOS).all())
    assert bool((out[:, P + 1] == EOS).all())
    assert int(n_masked_gen(out).sum()) == 0


def test_progress_callback_and_low_precision_logits() -> None:
    G = 8
    model = TinyDenoiser(P + G)
    seen: list[tuple[int, int]] = []
    cfg = SamplerConfig(steps=4, gen_length=G, block_length=4, temperature=1.0)
    out = generate(
        lambda x: model(x).bfloat16(), make_prompt(), MASK, cfg, progress=lambda i, n: seen.append((i, n))
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert int(n_masked_gen(out).sum()) == 0


def test_acceptance_profile_matches_linear_schedule() -> None:
    G = 10
    cfg = SamplerConfig(steps=4, gen_length=G, block_length=G)
    _, hist = generate(table_fn(random_table(P + G)), make_prompt(batch=1), MASK, cfg, return_history=True)
    assert commits_per_step(hist) == num_transfer_tokens(torch.tensor([G]), 4)[0].tolist() == [3, 3, 2, 2]


def _committed_tokens_per_step(hist: list[Tensor]) -> list[Tensor]:
    """Token committed at each step of a one-token-per-step run, per row: [B] per step."""
    out = []
    for a, b in zip(hist[:-1], hist[1:]):
        new = (a == MASK) & (b != MASK)
        assert bool((new.sum(dim=1) == 1).all())
        out.append(b[new])
    return out


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_temperature_schedule_runs_hot_early_and_cold_late(schedule: str) -> None:
    """The sampler draws step i of a block at temperature_at(1 - i/K): the first commits are
    sampled at T, the last ones almost greedily. Two candidate tokens with logits 2 and 0:
    at T = 4 the better one wins ~62% of draws, near T = 0 ~100%. A reversed schedule
    (greedy first, hot last) flips the two rates."""
    G, B = 16, 400
    table = torch.full((P + G, V), -30.0)
    table[:, 5], table[:, 6] = 2.0, 0.0
    cfg = SamplerConfig(steps=G, gen_length=G, block_length=G, temperature=4.0, temperature_schedule=schedule,
                        remasking="random", seed=3)
    _, hist = generate(table_fn(table), make_prompt(batch=B), MASK, cfg, return_history=True)
    best = [float((tok == 5).double().mean()) for tok in _committed_tokens_per_step(hist)]
    assert best[0] < 0.75, best      # hot: about sigmoid(2 / 4) = 0.62
    assert best[-1] > 0.97, best     # cold: T/16 (linear) or ~0 (cosine)
    assert sum(best[:4]) / 4 < sum(best[-4:]) / 4 - 0.2, best
    const = SamplerConfig(**{**cfg.__dict__, "temperature_schedule": "constant"})
    _, hist_c = generate(table_fn(table), make_prompt(batch=B), MASK, const, return_history=True)
    best_c = [float((tok == 5).double().mean()) for tok in _committed_tokens_per_step(hist_c)]
    assert max(best_c) < 0.75, best_c  # constant T: hot all the way


def test_renoise_rate_is_renoise_prob() -> None:
    """Each token committed earlier in the block is re-masked with probability renoise_prob
    at the start of every later step (ReMDM's constant rate)."""
    G, B, p_r = 16, 64, 0.3
    seen: list[Tensor] = []
    model = TinyDenoiser(P + G)

    def fn(x: Tensor) -> Tensor:
        seen.append(x.clone())
        return model(x)

    cfg = SamplerConfig(steps=G, gen_length=G, block_length=G, temperature=1.0, renoise_prob=p_r, seed=5)
    out, hist = generate(fn, make_prompt(batch=B), MASK, cfg, return_history=True)
    assert len(seen) == len(hist) - 1 == G
    # Before step j the block holds hist[j]'s committed tokens; the denoiser's input seen[j]
    # shows which of them were re-masked.
    trials = sum(int((h[:, P:] != MASK).sum()) for h in hist[1:-1])
    remasked = sum(int(((h[:, P:] != MASK) & (s[:, P:] == MASK)).sum()) for h, s in zip(hist[1:-1], seen[1:]))
    assert trials > 3000
    se = math.sqrt(p_r * (1 - p_r) / trials)
    assert abs(remasked / trials - p_r) < 4 * se, (remasked / trials, p_r, se)
    assert int(n_masked_gen(out).sum()) == 0
