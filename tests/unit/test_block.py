"""Block diffusion (BD3-LM): masks, noise, the training identities, attention backends, KV cache.

The identities (on a small random megatron-core denoiser, fp32, CPU):
- block_size == L is masked diffusion (same batch, same noise, same loss);
- block_size == 1 with t == 1 is the autoregressive next-token NLL;
- the vectorised 2L loss and its gradients equal a loop with one forward per block;
- KV-cached sampling sees the same logits as recomputing the full forward at every step.

Shape legend: B batch, L clean length, S = 2L, K block size, V vocab.
"""
from __future__ import annotations


import pytest
import torch

from dlm_megatron.diffusion import block as bd
from dlm_megatron.diffusion.masked import weighted_token_loss

V = 64          # small vocabulary: the model is built directly, no tokenizer
MASK = V - 1
L = 32
SEED = 7
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=192", "model.make_vocab_size_divisible_by=64", f"data.seq_len={L}",
         "diffusion.random_length_prob=0", "logging.wandb=disabled"]


# --------------------------------------------------------------------------- pure functions


def test_mask_2l_structure():
    # L = 4, blocks of 2: rows/cols are x_t[0..3] then x_0[0..3]; 1 = may attend.
    allowed = (~bd.block_diffusion_mask(4, 2))[0, 0].int().tolist()
    assert allowed == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # x_t block 1 sees its own block and clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # x_0 is block-causal and never sees x_t
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert bd.two_half_positions(2, 4).tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2
    assert (~bd.block_causal_mask(5, 2))[0, 0].int().tolist() == [
        [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="block_size"):
        bd.num_blocks(10, 4)


def _objective(block_size, **dkw):
    from dlm_megatron.config import DiffusionConfig
    from dlm_megatron.diffusion.objectives import BlockDiffusion, build_objective

    obj = build_objective(DiffusionConfig(objective="block", block_size=block_size, **dkw), MASK, SEED)
    assert isinstance(obj, BlockDiffusion)
    return obj


def test_noise_is_per_block_clipped_and_rank_independent():
    x0 = torch.randint(0, MASK, (8, L), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16, 24)
    obj = _objective(8, t_min=0.3, t_max=0.8)
    b = obj.make_batch(x0, pos, step=2, global_batch_size=8)
    assert b.tokens_BS.shape == (8, 2 * L) and b.num_tokens == 8 * L
    assert torch.equal(b.tokens_BS[:, L:], x0) and torch.equal(b.labels_BS[:, :L], x0)
    w = b.loss_weight_BS[:, :L].view(8, 4, 8)
    assert bool((b.loss_weight_BS[:, L:] == 0).all())
    assert torch.equal(w != 0, (b.tokens_BS[:, :L] == MASK).view(8, 4, 8))
    # One t per block: every masked token of a block carries the same weight 1/t, t in the clipped range.
    for row in w.reshape(-1, 8):
        vals = row[row != 0].unique()
        assert len(vals) <= 1 and all(0.3 <= 1 / v <= 0.8 + 1e-6 for v in vals.tolist())
    # A sample's noise depends on its global position only, not on how the batch is split.
    part = obj.make_batch(x0[5:7], pos[5:7], step=2, global_batch_size=8)
    assert torch.equal(part.tokens_BS, b.tokens_BS[5:7]) and torch.equal(part.loss_weight_BS, b.loss_weight_BS[5:7])


def test_antithetic_block_levels_are_stratified():
    obj = _objective(8, antithetic=True)
    G = 16
    t = obj.sample_t(torch.arange(G), step=0, global_batch_size=G, stream=1, K=4)
    u = (t - 1e-3) / (1 - 1e-3)
    for col in u.T:  # each block column covers [0, 1) with one point per 1/G stratum
        assert sorted((col * G).floor().long().tolist()) == list(range(G))


# --------------------------------------------------------------------------- model identities


@pytest.fixture(scope="module")
def build():
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist

    pdist.init_distributed(load_config("configs/tiny_block.yaml", SMALL))

    def make(config="configs/tiny_block.yaml", *overrides):
        cfg = load_config(config, SMALL + list(overrides))
        model = build_model(cfg, V, pre_process=True, post_process=True)
        init_weights(model, cfg, tp_rank=0, pp_rank=0)
        return model, cfg

    return make


def _loss(model, b):
    nll = model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=b.labels_BS,
                explicit_positions=b.position_ids_BS is not None)
    return weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens)


def _nll_fn(model):
    def fn(tokens, positions, mask, labels):
        return model(tokens, positions, mask, labels=labels, explicit_positions=True)

    return fn


def _x0(batch=3, seed=0):
    return torch.randint(0, MASK, (batch, L), generator=torch.Generator().manual_seed(seed))


def test_one_block_equals_masked_diffusion(build):
    from dlm_megatron.diffusion.objectives import MaskedDiffusion

    masked_model, mcfg = build("configs/tiny.yaml")
    block_model, bcfg = build("configs/tiny_block.yaml", f"diffusion.block_size={L}")
    x0, pos = _x0(), torch.arange(3, 6)
    for antithetic in (False, True):
        mcfg.diffusion.antithetic = bcfg.diffusion.antithetic = antithetic
        bm = MaskedDiffusion(mcfg.diffusion, MASK, SEED).make_batch(x0, pos, step=1, global_batch_size=3)
        bb = _objective(L, antithetic=antithetic).make_batch(x0, pos, step=1, global_batch_size=3)
        assert torch.equal(bb.tokens_BS[:, :L], bm.tokens_BS)  # same noise, bit for bit
        assert torch.allclose(_loss(block_model, bb), _loss(masked_model, bm), rtol=1e-5, atol=1e-6)


def test_block_size_one_at_t_one_is_autoregressive_nll(build):
    model, _ = build("configs/tiny_block.yaml", "diffusion.block_size=1")
    x0 = _x0(2)
    xt, is_masked = bd.mask_blocks(x0, torch.ones(2, L), torch.rand(2, L), MASK, 1)
    assert bool(is_masked.all())
    tokens, labels, w = bd.two_half_inputs(x0, xt, bd.loss_weights(is_masked, torch.ones(2, L), 1))
    nll = model(tokens, bd.two_half_positions(2, L), bd.block_diffusion_mask(L, 1), labels=labels, explicit_positions=True)
    loss = weighted_token_loss(nll, w, x0.numel())
    # Chain rule, one token at a time: p(x_i | x_<i) read at a MASK placed at position i.
    ar = 0.0
    for i in range(L):
        seq = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], dim=1)
        logits = model(seq, torch.arange(i + 1).expand(2, -1), bd.block_causal_mask(i + 1, 1), explicit_positions=True)
        ar += torch.nn.functional.cross_entropy(logits[:, -1, :V].float(), x0[:, i], reduction="sum")
    assert torch.allclose(loss, ar / x0.numel(), rtol=1e-5, atol=1e-6)


def test_vectorised_loss_and_grads_equal_per_block_loop(build):
    model, cfg = build("configs/tiny_block.yaml", "diffusion.block_size=8")
    b = _objective(8).make_batch(_x0(), torch.arange(3), step=0, global_batch_size=3)
    model.zero_grad()
    vec = _loss(model, b)
    vec.backward()
    g_vec = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x0, xt, w = b.labels_BS[:, :L], b.tokens_BS[:, :L], b.loss_weight_BS[:, :L]
    loop = bd.per_block_loss(_nll_fn(model), x0, xt, w, 8)
    loop.backward()
    assert torch.allclose(vec, loop, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(g_vec[n], p.grad, rtol=1e-4, atol=1e-6), n


# --------------------------------------------------------------------------- attention backends


def test_flex_forward_matches_dense(build):
    from dlm_megatron.model import attention as att

    with torch.no_grad():
        dense, _ = build("configs/tiny_block.yaml", "data.seq_len=128", "model.attention_backend=dense")
        flex, _ = build("configs/tiny_block.yaml", "data.seq_len=128", "model.attention_backend=flex")
        assert flex.decoder.layers[0].self_attention.core_attention.backend == "flex"
        x0 = torch.randint(0, MASK, (2, 128), generator=torch.Generator().manual_seed(1))
        xt, _ = bd.mask_blocks(x0, torch.full((2, 8), 0.5), torch.rand(2, 128), MASK, 16)
        tokens, _, _ = bd.two_half_inputs(x0, xt, torch.zeros(2, 128))
        pos, mask = bd.two_half_positions(2, 128), bd.block_diffusion_mask(128, 16)
        ref = dense(tokens, pos, mask, explicit_positions=True)
        out = flex(tokens, pos, mask, explicit_positions=True)
        assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()
        # Any other mask (here block-causal over 100 tokens) goes through the generic path.
        causal = bd.block_causal_mask(100, 16)
        p100 = torch.arange(100).expand(2, -1)
        assert torch.allclose(flex(x0[:, :100], p100, causal, explicit_positions=True),
                              dense(x0[:, :100], p100, causal, explicit_positions=True), atol=2e-5)
    # The 2L mask's BlockMask skips tiles: at L=512, K=16 about half of the 128x128 tiles are empty;
    # the interval count the MFU uses (no S x S mask) agrees with torch's BlockMask exactly.
    assert att.block_mask_2l(512, 16, torch.device("cpu")).sparsity() > 40.0
    for L, K in ((512, 16), (384, 16), (256, 4), (192, 64), (1024, 1), (128, 128)):
        frac = bd.attended_tile_fraction(L, K)
        assert frac == pytest.approx(1 - att.block_mask_2l(L, K, torch.device("cpu")).sparsity() / 100, abs=1e-12), (L, K)
    assert att.resolve_backend("auto", block=True, cuda=False) == "sdpa"
    assert att.resolve_backend("auto", block=True, cuda=True) == "flex"
    assert att.resolve_backend("auto", block=False, cuda=True) == "sdpa"


# --------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("knobs", [
    dict(temperature=0.0, remasking="low_confidence"),
    dict(temperature=1.0, temperature_schedule="cosine", remasking="random", renoise_prob=0.2),
    dict(temperature=0.7, remasking="margin", confidence_threshold=0.02),
])
def test_kv_cache_logits_equal_full_recompute(build, knobs):
    from dlm_megatron.sampling import SamplerConfig, generate_blocks

    model, _ = build("configs/tiny_block.yaml", "diffusion.block_size=4")
    model.eval()
    prompt = torch.randint(0, MASK - 1, (2, 6), generator=torch.Generator().manual_seed(3))  # 6: not on the block grid
    scfg = SamplerConfig(gen_length=12, block_length=4, steps=12, seed=5, **knobs)
    seen = {True: [], False: []}
    outs = {}
    for cache in (True, False):
        outs[cache] = generate_blocks(model, prompt, MASK, scfg, vocab_size=V, use_cache=cache, eos_id=None,
                                      on_logits=lambda lo, i, lg, c=cache: seen[c].append((lo, i, lg)))
    assert len(seen[True]) == len(seen[False]) > 0
    for (lo_a, i_a, a), (lo_b, i_b, b) in zip(seen[True], seen[False]):
        assert (lo_a, i_a) == (lo_b, i_b)
        assert torch.allclose(a, b, atol=1e-5), (lo_a, i_a, (a - b).abs().max())
    assert torch.equal(outs[True], outs[False])
    out = outs[True]
    assert out.shape == (2, 18) and torch.equal(out[:, :6], prompt) and not bool((out == MASK).any())


def test_generate_dispatches_block_checkpoints(build, monkeypatch):
    """generate.sample_text sends a block-diffusion checkpoint to the KV-cached block sampler
    on the trained block grid, never to the masked (LLaDA) sampler, and prints its output."""
    import dlm_megatron.sampling as sampling
    from dlm_megatron.generate import sample_text

    model, cfg = build("configs/tiny_block.yaml", "diffusion.block_size=4", "generate.gen_length=8",
                       "generate.steps=8", "generate.block_length=8")

    class Tok:
        vocab_size, mask_id, eot_id, pad_id = V, MASK, 0, 1

        def encode(self, s):
            return [ord(c) % 60 + 2 for c in s]

        def decode(self, ids):
            return " ".join(map(str, ids))

    calls = []
    real_blocks, real_masked = sampling.generate_blocks, sampling.generate

    def spy_blocks(module, x, mask_id, scfg, **kw):
        out = real_blocks(module, x, mask_id, scfg, **kw)
        calls.append(("blocks", scfg.block_length, out.clone()))
        return out

    def spy_masked(*a, **kw):
        calls.append(("masked",))
        return real_masked(*a, **kw)

    monkeypatch.setattr(sampling, "generate_blocks", spy_blocks)
    monkeypatch.setattr(sampling, "generate", spy_masked)
    text = sample_text(model, Tok(), cfg, device="cpu", prompt="ab")
    assert [c[0] for c in calls] == ["blocks"], calls
    assert calls[0][1] == 4  # the trained diffusion.block_size, not generate.block_length (8)
    out = calls[0][2][0].tolist()
    gen = out[2:]
    gen = gen[: gen.index(0)] if 0 in gen else gen  # cut at EOT as sample_text does
    assert text == " ".join(map(str, out[:2] + gen)) and text.startswith(" ".join(map(str, Tok().encode("ab"))))


# --------------------------------------------------------------------------- the bound's range of t


def test_eval_noise_ignores_the_clipped_training_range():
    """Training draws block levels from [t_min, t_max]; evaluation (make_batch(eval=True),
    which validation and dlm_megatron.eval use) from (eps, 1) whatever the clipping, and
    identically for a clipped and an unclipped config."""
    x0, pos = _x0(64, seed=2), torch.arange(64)
    clipped, full = _objective(8, t_min=0.3, t_max=0.8), _objective(8)
    t_train = clipped.sample_t(pos, step=0, global_batch_size=64, stream=1, K=4)
    assert t_train.min() >= 0.3 and t_train.max() <= 0.8
    ev_clip = clipped.make_batch(x0, pos, step=0, global_batch_size=64, eval=True)
    ev_full = full.make_batch(x0, pos, step=0, global_batch_size=64, eval=True)
    assert torch.equal(ev_clip.tokens_BS, ev_full.tokens_BS) and torch.equal(ev_clip.loss_weight_BS, ev_full.loss_weight_BS)
    t_eval = 1 / ev_clip.loss_weight_BS[ev_clip.loss_weight_BS != 0]
    assert t_eval.min() < 0.3 and t_eval.max() > 0.8  # levels outside the training range are evaluated


def test_clipped_checkpoint_reports_the_unclipped_bound(tmp_path):
    """A block-diffusion run trained with t in [0.3, 0.8] reports, in its in-training
    validation and through dlm_megatron.eval, the same bound as the same weights with the
    config at [0, 1] (bit for bit: the evaluation noise does not read t_min / t_max)."""
    import json
    import shutil

    from common import COMMON_OVERRIDES

    from dlm_megatron import eval as ev
    from dlm_megatron.config import load_config
    from dlm_megatron.train import Trainer, quiet_warnings

    quiet_warnings()
    run_dir = tmp_path / "run"
    base = list(COMMON_OVERRIDES) + ["diffusion.block_size=8", "train.steps=2", f"train.output_dir={run_dir}"]
    clipped = Trainer(load_config("configs/tiny_block.yaml", base + ["diffusion.t_min=0.3", "diffusion.t_max=0.8"]))
    t_train = torch.cat([b.t_B for b in clipped.step_batches(0)])
    assert t_train.min() >= 0.3 and t_train.max() <= 0.8  # the run really trains on the clipped range
    val_clipped = clipped.fit()["val"]
    # The same weights (resumed from the final checkpoint, nothing left to train) at [0, 1].
    val_full = Trainer(load_config("configs/tiny_block.yaml", base)).fit()["val"]
    assert val_full["step"] == val_clipped["step"] == 2
    assert val_full["loss"] == val_clipped["loss"], (val_full, val_clipped)

    ckpt = run_dir / "checkpoints" / "step_000002"
    unclipped = tmp_path / "unclipped_step_000002"
    shutil.copytree(ckpt, unclipped)
    meta = json.loads((unclipped / "meta.json").read_text())
    assert (meta["config"]["diffusion"]["t_min"], meta["config"]["diffusion"]["t_max"]) == (0.3, 0.8)
    meta["config"]["diffusion"].update(t_min=0.0, t_max=1.0)
    (unclipped / "meta.json").write_text(json.dumps(meta))
    data = tmp_path / "text.txt"
    data.write_text("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 4)
    lines = {}
    for name, path in (("clipped", ckpt), ("unclipped", unclipped)):
        args = ev.build_parser().parse_args(["--ckpt", str(path), "--data", str(data), "--num-samples", "4", "--device", "cpu"])
        lines[name] = [ln for ln in ev.run(args) if ln.startswith(("nll bound", "perplexity_bound"))]
    assert len(lines["clipped"]) == 2 and lines["clipped"] == lines["unclipped"], lines
