"""SFT data and objective: prompt never noised, zero weight on the prompt, LLaDA normalisation."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlm_megatron.data import DataError
from dlm_megatron.data.sft import SFTDataset, encode_example, render_messages
from dlm_megatron.diffusion.objectives import SFTMaskedDiffusion

EOT, MASK = 0, 1


def test_encode_example_pads_response_with_eot_and_cuts():
    a = encode_example([5, 6, 7], [8, 9], 8, EOT)
    assert a.tolist() == [5, 6, 7, 8, 9, EOT, EOT, EOT, 3]
    b = encode_example(list(range(10, 20)), [8, 9], 6, EOT)  # prompt cut from the left, >= 1 response token
    assert b[-1] == 5 and b[:5].tolist() == list(range(15, 20)) and b[5] == 8


def test_render_messages():
    p, r = render_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "<{role}>{content}|")
    assert p == "<user>hi|<assistant>" and r == "yo"


def test_dataset_formats_and_errors(tmp_path):
    tok = SimpleNamespace(eot_id=EOT, encode_batch=lambda xs: [[2 + (ord(c) % 50) for c in x] for x in xs])
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"prompt": "ab", "response": "cd"}) + "\n" +
                 json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n")
    ds = SFTDataset(f, tok, 12)
    assert len(ds) == 2 and ds[0].shape == (13,) and ds.sample_width == 13 and ds[0][-1] == 2
    f.write_text("{\"foo\": 1}\n")
    with pytest.raises(DataError):
        SFTDataset(f, tok, 12)


def test_prompt_never_masked_and_weights():
    obj = SFTMaskedDiffusion(SimpleNamespace(eps=1e-3, antithetic=False, random_length_prob=0.5), MASK, seed=0)
    L = 16
    rows = [encode_example(list(range(2, 2 + p)), list(range(40, 40 + r)), L, EOT) for p, r in ((3, 5), (10, 2), (1, 14), (7, 4))]
    x = torch.from_numpy(np.stack(rows))
    for step in range(20):
        b = obj.make_batch(x, torch.arange(4) + 4 * step, step=step, global_batch_size=4)
        P = x[:, -1]
        prompt = torch.arange(L)[None, :] < P[:, None]
        assert b.tokens_BS.shape == (4, L)
        assert torch.equal(b.tokens_BS[prompt], x[:, :-1][prompt])          # prompt never masked
        assert (b.loss_weight_BS[prompt] == 0).all()                          # no loss on the prompt
        masked = b.tokens_BS == MASK
        assert (b.loss_weight_BS[~masked] == 0).all()
        # sum_i w_i nll_i / (B L) == mean_b [ sum_{masked i} nll_i / (t_b |response_b|) ]  (LLaDA SFT)
        nll = torch.rand(4, L, generator=torch.Generator().manual_seed(step))
        ours = (b.loss_weight_BS * nll).sum() / (4 * L)
        resp = (L - P).float()
        ref = torch.stack([(nll[i][masked[i]] / b.t_B[i]).sum() / resp[i] for i in range(4)]).mean()
        assert torch.allclose(ours, ref, rtol=1e-5)


def test_response_tokens_are_masked_at_rate_t():
    """Each response token (EOT padding included) is masked with probability t: per sample
    the masked fraction of the response tracks its t, across the whole range of t."""
    obj = SFTMaskedDiffusion(SimpleNamespace(eps=1e-3, antithetic=False, random_length_prob=0.0), MASK, seed=3)
    L, B = 64, 1024
    g = torch.Generator().manual_seed(0)
    P = torch.randint(1, 17, (B,), generator=g)
    rows = [encode_example(list(range(2, 2 + int(p))), list(range(40, 40 + int(r))), L, EOT)
            for p, r in zip(P, torch.randint(8, 40, (B,), generator=g))]
    x = torch.from_numpy(np.stack(rows))
    b = obj.make_batch(x, torch.arange(B), step=0, global_batch_size=B)
    response = torch.arange(L)[None, :] >= x[:, -1:]
    masked = (b.tokens_BS == MASK) & response
    frac = masked.sum(1) / response.sum(1)
    t = b.t_B.double()
    assert t.min() < 0.1 and t.max() > 0.9  # the draw covers the range of t
    # Binomial(n, t) / n around t: the mean deviation is 0 within a few standard errors ...
    se = (t * (1 - t) / response.sum(1)).sum().sqrt() / B
    assert abs((frac - t).mean()) < 4 * se, ((frac - t).mean(), se)
    # ... and so is every fifth of the range (a rate of t/2, or of sqrt(t), shows here).
    for lo in (0.0, 0.2, 0.4, 0.6, 0.8):
        sel = (t >= lo) & (t < lo + 0.2)
        assert abs((frac[sel] - t[sel]).mean()) < 0.03, (lo, frac[sel].mean(), t[sel].mean())
    assert torch.equal(b.loss_weight_BS != 0, masked)  # the loss sees exactly the masked response tokens


def test_prompt_dropout_masks_whole_prompts_at_rate_p():
    """diffusion.prompt_dropout p: each training example has its whole prompt masked with
    probability p (Binomial(B, p) examples, within 4 standard errors), all or nothing per
    example; the response's noise, the labels and the loss weights are those of p = 0;
    validation batches never drop; the draw depends on the global sample position only."""
    L, B, p = 24, 2000, 0.3
    g = torch.Generator().manual_seed(1)
    rows = [encode_example(list(range(2, 2 + int(n))), list(range(40, 48)), L, EOT)
            for n in torch.randint(1, 12, (B,), generator=g)]
    x = torch.from_numpy(np.stack(rows))
    dcfg = dict(eps=1e-3, antithetic=False, random_length_prob=0.0)
    off = SFTMaskedDiffusion(SimpleNamespace(**dcfg), MASK, seed=5).make_batch(x, torch.arange(B), step=0, global_batch_size=B)
    obj = SFTMaskedDiffusion(SimpleNamespace(**dcfg, prompt_dropout=p), MASK, seed=5)
    on = obj.make_batch(x, torch.arange(B), step=0, global_batch_size=B)
    prompt = torch.arange(L)[None, :] < x[:, -1:]
    masked_prompt = (on.tokens_BS == MASK) & prompt
    dropped = masked_prompt.any(1)
    assert torch.equal(masked_prompt.sum(1), torch.where(dropped, prompt.sum(1), 0))  # whole prompt or none of it
    assert abs(int(dropped.sum()) - B * p) < 4 * (B * p * (1 - p)) ** 0.5, int(dropped.sum())
    assert torch.equal(on.tokens_BS[~prompt], off.tokens_BS[~prompt])  # response noise unchanged
    assert torch.equal(on.loss_weight_BS, off.loss_weight_BS) and torch.equal(on.labels_BS, off.labels_BS)
    assert torch.equal(on.tokens_BS[~dropped], off.tokens_BS[~dropped])
    val = obj.make_batch(x, torch.arange(B), step=0, global_batch_size=B, eval=True)
    assert not bool(((val.tokens_BS == MASK) & prompt).any())
    # layout independence: samples 100..109 drop the same way when they come in another batch
    part = obj.make_batch(x[100:110], torch.arange(100, 110), step=7, global_batch_size=10)
    assert torch.equal(part.tokens_BS == MASK, on.tokens_BS[100:110] == MASK)


@pytest.mark.parametrize("overrides,msg", [
    (["diffusion.prompt_dropout=1.0", "data.sft_path=x.jsonl"], "diffusion.prompt_dropout must be in"),
    (["diffusion.prompt_dropout=0.1"], "set data.sft_path"),
])
def test_prompt_dropout_config_errors(overrides, msg):
    from dlm_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=msg):
        load_config("configs/tiny.yaml", overrides)


# --------------------------------------------------------------------------- variable length


def _tok():
    return SimpleNamespace(eot_id=EOT, encode_batch=lambda xs: [[2 + (ord(c) % 50) for c in x] for x in xs])


def test_global_batch_is_padded_to_its_longest_example(tmp_path):
    """data.sft_padding=batch: a global batch is cut to its longest example (prompt + response
    + EOT) rounded up to a multiple of 8, at most seq_len, the same length for every rank's
    rows; a sample cut so is exactly the example encoded at that length (EOT padding up to
    it); the trainer's batch is that long, not seq_len."""
    from dlm_megatron.data.sft import batch_length, cut_to_length, pad_multiple
    from dlm_megatron.train import fit_to_batch

    pairs = [("ab", "cd"), ("abcdefg", "hijklmnop"), ("a", "b"), ("abc", "d" * 70)]  # contents 5, 17, 3, 64 (cut)
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    seq_len = 64
    ds = SFTDataset(f, _tok(), seq_len, pad_to_batch=8)
    assert ds.lengths.tolist() == [5, 17, 3, 64]
    assert [ds.batch_length(i) for i in ([0], [0, 2], [0, 1], [2, 1, 0], [3, 0])] == [8, 8, 24, 24, 64]
    assert SFTDataset(f, _tok(), seq_len).batch_length([0]) == seq_len  # sft_padding=seq_len: today's padding
    assert batch_length([9], 8, 12) == 12 and pad_multiple() == 8 and pad_multiple("block", 12) == 24
    tok = _tok()
    for idx in ([0, 2], [0, 1, 2]):
        L = ds.batch_length(idx)
        cut = cut_to_length(np.stack([ds[i] for i in idx]), L)
        want = np.stack([encode_example(*tok.encode_batch(pairs[i]), L, EOT) for i in idx])
        assert np.array_equal(cut, want), (idx, cut, want)
    # One rank of two holds rows 2 and 0 (contents 3, 5) of the global batch [1, 0, 2, 0]: it
    # pads to the global longest (17 -> 24), as the rank holding row 1 does.
    g = np.array([1, 0, 2, 0])
    mine = fit_to_batch(ds, g, np.stack([ds[2], ds[0]]))
    assert mine.shape == (2, 25) and np.array_equal(mine[:, -1], [1, 2])
    # The objective then sees 24 tokens per sample and normalises by the response up to 24.
    obj = SFTMaskedDiffusion(SimpleNamespace(eps=1e-3, antithetic=False, random_length_prob=0.0), MASK, seed=0)
    b = obj.make_batch(torch.from_numpy(mine), torch.arange(2), step=0, global_batch_size=4)
    assert b.tokens_BS.shape == (2, 24) and b.num_tokens == 2 * 24
    nll = torch.rand(2, 24, generator=torch.Generator().manual_seed(0))
    masked = b.loss_weight_BS != 0
    ref = torch.stack([(nll[i][masked[i]] / b.t_B[i]).sum() / (24 - [1, 2][i]) for i in range(2)]).mean()
    assert torch.allclose((b.loss_weight_BS * nll).sum() / b.num_tokens, ref, rtol=1e-5)
    assert np.array_equal(fit_to_batch(SFTDataset(f, _tok(), seq_len), g, np.stack([ds[2]])), np.stack([ds[2]]))


def test_sft_padding_key_is_validated():
    from dlm_megatron.config import ConfigError, load_config

    assert load_config("configs/tiny.yaml", []).data.sft_padding == "batch"
    with pytest.raises(ConfigError, match="data.sft_padding='longest' is not one of batch, seq_len"):
        load_config("configs/tiny.yaml", ["data.sft_padding=longest"])


def test_shifted_model_fine_tunes_with_shifted_targets():
    """diffusion.shift_logits with SFT (an AR-adapted model): output i-1 carries token i's
    label and weight, the same noise as the unshifted SFT batch, prompt still clean."""
    dc = dict(eps=1e-3, antithetic=False, random_length_prob=0.0)
    plain = SFTMaskedDiffusion(SimpleNamespace(**dc), MASK, seed=5)
    shifted = SFTMaskedDiffusion(SimpleNamespace(**dc, shift_logits=True), MASK, seed=5)
    L = 16
    rows = [encode_example(list(range(2, 2 + p)), list(range(40, 40 + r)), L, EOT) for p, r in ((3, 5), (10, 2), (1, 14))]
    x = torch.from_numpy(np.stack(rows))
    a = plain.make_batch(x, torch.arange(3), step=0, global_batch_size=3)
    b = shifted.make_batch(x, torch.arange(3), step=0, global_batch_size=3)
    assert torch.equal(b.tokens_BS, a.tokens_BS)                       # same noise; token 0 is prompt
    assert torch.equal(b.labels_BS[:, :-1], a.labels_BS[:, 1:])
    assert torch.equal(b.loss_weight_BS[:, :-1], a.loss_weight_BS[:, 1:]) and (b.loss_weight_BS[:, -1] == 0).all()
    assert a.loss_weight_BS.sum() > 0


def test_sft_refuses_annealing():
    from dlm_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="anneal_steps=0"):
        load_config("configs/tiny.yaml", ["data.sft_path=x.jsonl", "diffusion.anneal_steps=10"])
