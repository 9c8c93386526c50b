"""Fast-dLLM's prefix / dual KV cache for masked models, on a real megatron-core denoiser.

At each refresh (the first step of every block) the cache holds exactly the keys/values of a
full forward of the current sequence, and a cached step run right then gives the full
forward's logits (1e-5). Between refreshes the cache is Fast-dLLM's approximation (measured
in benchmarks/bench_fast_dllm.py, reported in docs/BENCHMARKS.md). cache=none is the plain
sampler. Shape legend: B batch, P prompt, S sequence, V vocab.
"""
from __future__ import annotations

import functools

import legacy_masked_sampler as legacy
import pytest
import torch

from dlm_megatron.sampling import SamplerConfig, generate, model_logits_fn

V = 64
MASK = V - 1
EOS = 2
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=192", "model.make_vocab_size_divisible_by=64", "data.seq_len=32",
         "diffusion.random_length_prob=0", "logging.wandb=disabled"]


@functools.lru_cache(maxsize=4)
def build_model_for(objective: str = "masked", *overrides: str):
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist

    config = "configs/tiny_block.yaml" if objective == "block" else "configs/tiny.yaml"
    extra = ["diffusion.block_size=4"] if objective == "block" else []
    cfg = load_config(config, SMALL + extra + list(overrides))
    pdist.init_distributed(cfg)
    model = build_model(cfg, V, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    # Sharpen the output so the random model has confident and unconfident positions.
    with torch.no_grad():
        model.output_layer.weight.mul_(8.0)
    return model.eval()


def _prompt(B=2, P=6, seed=3):
    return torch.randint(3, MASK - 1, (B, P), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("shift", [False, True])
def test_cache_at_each_refresh_equals_a_full_forward(mode, shift):
    model = build_model_for("masked")
    fn = model_logits_fn(model, V, shift=shift)
    checks = []

    def on_refresh(runner, x, lo, hi):
        fresh = runner.capture(x)  # keys/values of a full forward of the sequence as it is now
        kv_diff = max(max((runner.hook.kv[m][0] - k).abs().max().item(), (runner.hook.kv[m][1] - v).abs().max().item())
                      for m, (k, v) in fresh.items())
        logit_diff = (runner.block_logits(x, lo, hi) - fn(x)[:, lo:hi]).abs().max().item()  # the uncached sampler's logits
        checks.append((lo, kv_diff, logit_diff, len(fresh)))

    cfg = SamplerConfig(steps=16, gen_length=16, block_length=4, temperature=0.7, seed=2, cache=mode)
    out = generate(fn, _prompt(), MASK, cfg, on_refresh=on_refresh)
    assert [c[0] for c in checks] == [6, 10, 14, 18]  # refreshed when each block starts (after the previous completed)
    for lo, kv_diff, logit_diff, n in checks:
        assert n == 2 and kv_diff < 1e-5 and logit_diff < 1e-5, (lo, kv_diff, logit_diff)
    assert not bool((out == MASK).any())


def test_cached_steps_see_fewer_tokens_and_the_stale_cache_is_an_approximation():
    """Between refreshes the cached keys/values of the other tokens are stale: a cached step
    equals a full forward only approximately. Prefix runs block + suffix, dual the block."""
    from dlm_megatron.sampling.cache import FastDLLMCache

    model = build_model_for("masked")
    x = torch.cat([_prompt(1), torch.full((1, 16), MASK)], dim=1)
    r = {m: FastDLLMCache(model, V, m) for m in ("prefix", "dual")}
    for m in r.values():
        m.refresh(x, 6, 10)
    x2 = x.clone()
    x2[:, 6:8] = torch.tensor([5, 7])  # two tokens of the block committed since the refresh
    full = r["dual"].full_logits(x2)[:, 6:10]
    for mode, runner in r.items():
        before = runner.tokens_run
        diff = (runner.block_logits(x2, 6, 10) - full).abs().max().item()
        ran = runner.tokens_run - before
        assert ran == (4 if mode == "dual" else 16), (mode, ran)
        assert 1e-6 < diff < 5.0, (mode, diff)


def test_cache_none_is_the_previous_sampler_on_a_real_model():
    model = build_model_for("masked")
    fn = model_logits_fn(model, V)
    for knobs in (dict(), dict(temperature=1.0, remasking="random"), dict(confidence_threshold=0.3, renoise_prob=0.2,
                                                                         temperature=0.5)):
        base = dict(steps=16, gen_length=16, block_length=8, seed=9, **knobs)
        got = generate(fn, _prompt(), MASK, SamplerConfig(**base, cache="none"), eos_id=EOS)
        want = legacy.generate(fn, _prompt(), MASK, legacy.SamplerConfig(**base), eos_id=EOS)
        assert torch.equal(got, want), knobs


def test_dual_cache_with_threshold_and_guidance_refreshes_exactly():
    """Guidance under the cache: the cache holds the conditional and the unconditional rows;
    the first step of a block runs on the refresh (a full forward), so it commits exactly
    what the uncached guided sampler commits."""
    model = build_model_for("masked")
    fn = model_logits_fn(model, V)
    hist, rows = {}, []
    for cache in ("none", "dual"):
        cfg = SamplerConfig(steps=8, gen_length=8, block_length=4, cfg_scale=1.0, parallel_threshold=0.6, cache=cache)
        out, hist[cache] = generate(fn, _prompt(), MASK, cfg, return_history=True,
                                    on_refresh=lambda r, x, lo, hi: rows.append(x.shape[0]))
        assert not bool((out == MASK).any())
    assert rows == [4, 4]  # 2 conditional + 2 unconditional rows, one refresh per block
    assert torch.equal(hist["none"][1], hist["dual"][1])
    assert int((hist["none"][1] != hist["none"][0]).sum()) >= 2  # the first step did commit something


class _CatSplice:
    """The reference splice: cached keys/values before and after the window, concatenated
    with the window's fresh ones (what the preallocated in-place buffers must equal)."""

    def __init__(self, kv, window):
        self.kv, self.window = kv, window

    def extend(self, module, key, value):
        ck, cv = self.kv[module]
        a, b = self.window
        return torch.cat([ck[:a], key, ck[b:]]), torch.cat([cv[:a], value, cv[b:]])


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_in_place_splice_equals_concatenating_the_cache(mode):
    """The cache writes each cached step's window into preallocated buffers; successive steps
    (different tokens in the block) give exactly the logits of torch.cat splicing into the
    refresh's keys/values."""
    from dlm_megatron.sampling.cache import FastDLLMCache
    from dlm_megatron.sampling.hooks import attached

    model = build_model_for("masked")
    x = torch.cat([_prompt(1), torch.full((1, 16), MASK)], dim=1)
    runner = FastDLLMCache(model, V, mode)
    runner.refresh(x, 6, 10)
    ref_kv = runner.capture(x)
    b = 10 if mode == "dual" else x.shape[1]
    for committed in ([5], [5, 7], [5, 7, 9, 11]):
        x[:, 6:6 + len(committed)] = torch.tensor(committed)
        got = runner.block_logits(x, 6, 10)
        with torch.no_grad(), attached(model, _CatSplice(ref_kv, (6, b))):
            out = model(x[:, 6:b], torch.arange(6, b)[None], None, explicit_positions=True)
        assert torch.equal(got, out[:, :4, :V].float()), (committed, (got - out[:, :4, :V]).abs().max())


@pytest.mark.parametrize("shift", [False, True])
def test_output_layer_runs_on_the_masked_positions_only(shift, monkeypatch):
    """Only masked block positions' logits are read, so only those (at least MIN_OUTPUT_ROWS)
    go through the output layer, at the refresh and at cached steps; the tokens are those of
    the sampler that runs every window position through it."""
    from dlm_megatron.sampling import cache as cache_mod

    model = build_model_for("masked")
    fn = model_logits_fn(model, V, shift=shift)
    rows = []
    handle = model.output_layer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    cfg = SamplerConfig(steps=32, gen_length=32, block_length=16, temperature=0.7, seed=4, cache="dual",
                        parallel_threshold=0.5)
    try:
        got, hist = generate(fn, _prompt(), MASK, cfg, return_history=True)
        restricted = list(rows)
        rows.clear()
        monkeypatch.setattr(cache_mod.FastDLLMCache, "_output_positions", lambda self, *a: None)
        want, want_hist = generate(fn, _prompt(), MASK, cfg, return_history=True)
    finally:
        handle.remove()
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(hist, want_hist))
    assert len(hist) == len(want_hist) > 4
    # the refresh: 16 block rows of the 38-token sequence; later steps fewer than the 16 (17 shifted) window rows
    assert restricted[0] == 16 and rows[0] == 38, (restricted, rows)
    assert min(restricted) == cache_mod.MIN_OUTPUT_ROWS and sum(restricted) < sum(rows)
