"""AR -> diffusion adaptation (DiffuLLaMA, Gong et al. 2025; Dream): annealed attention
masks, shifted logits, and the adapted model at annealing step 0 being the AR model."""
from __future__ import annotations

import pytest
import torch

from common import env, COMMON_OVERRIDES, PY, REPO, metrics, run

from dlm_megatron.diffusion import adaptation as ad

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=192",
         "data.seq_len=16", "diffusion.random_length_prob=0.0"]


def test_anneal_fraction_schedule():
    assert ad.anneal_fraction(0, 10) == 0.0
    assert ad.anneal_fraction(5, 10) == 0.5
    assert ad.anneal_fraction(10, 10) == 1.0 and ad.anneal_fraction(99, 10) == 1.0
    assert ad.anneal_fraction(0, 0) == 1.0  # off: full attention


def test_mask_is_causal_at_start_and_full_at_anneal_steps():
    L, n = 24, 8
    m0 = ad.annealed_mask(L, ad.anneal_fraction(0, n), seed=1, step=0)
    assert m0.shape == (1, 1, L, L) and torch.equal(m0[0, 0], torch.ones(L, L, dtype=torch.bool).triu(1))
    visible = []
    for s in range(n + 2):
        m = ad.annealed_mask(L, ad.anneal_fraction(s, n), seed=1, step=s)[0, 0]
        assert not m.tril().any(), "the causal part (j <= i) must always be visible"
        visible.append((~m).triu(1).sum().item() / (L * (L - 1) / 2))
    assert visible[0] == 0.0 and visible[n] == 1.0 and visible[n + 1] == 1.0
    assert all(0.0 < v < 1.0 for v in visible[1:n])
    # Fraction of future keys unmasked tracks s / anneal_steps.
    for s in range(1, n):
        assert abs(visible[s] - s / n) < 0.15, (s, visible[s])
    # Deterministic per (seed, step), different across steps.
    assert torch.equal(ad.annealed_mask(L, 0.5, 3, 4), ad.annealed_mask(L, 0.5, 3, 4))
    assert not torch.equal(ad.annealed_mask(L, 0.5, 3, 4), ad.annealed_mask(L, 0.5, 3, 5))


def test_objective_batch_shift_and_mask():
    from dlm_megatron.config import DiffusionConfig
    from dlm_megatron.diffusion.objectives import AdaptedMaskedDiffusion, MaskedDiffusion, build_objective

    d = DiffusionConfig(objective="masked", anneal_steps=4, shift_logits=True, random_length_prob=0.0)
    obj = build_objective(d, mask_id=99, seed=7)
    assert isinstance(obj, AdaptedMaskedDiffusion)
    x0 = torch.randint(0, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(4)
    b = obj.make_batch(x0, pos, step=0, global_batch_size=4)
    ref = MaskedDiffusion(DiffusionConfig(objective="masked", random_length_prob=0.0), 99, 7).make_batch(
        x0, pos, step=0, global_batch_size=4)
    assert torch.equal(b.attention_mask[0, 0], torch.ones(12, 12, dtype=torch.bool).triu(1))
    assert torch.equal(b.tokens_BS[:, 0], x0[:, 0])                      # token 0 never masked
    assert torch.equal(b.tokens_BS[:, 1:], ref.tokens_BS[:, 1:])          # same noise otherwise
    assert torch.equal(b.labels_BS[:, :-1], x0[:, 1:])                    # output i-1 -> token i
    assert torch.equal(b.loss_weight_BS[:, :-1], ref.loss_weight_BS[:, 1:]) and (b.loss_weight_BS[:, -1] == 0).all()
    assert b.num_tokens == 4 * 12
    assert not obj.make_batch(x0, pos, step=4, global_batch_size=4).attention_mask.any()
    assert not obj.make_batch(x0, pos, step=0, global_batch_size=4, eval=True).attention_mask.any()


@pytest.fixture(scope="module")
def models():
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist

    pdist.init_distributed(load_config(f"{REPO}/configs/tiny.yaml", SMALL))
    out = {}
    for name, extra in (("ar", ["diffusion.objective=ar"]),
                        ("adapted", ["diffusion.objective=masked", "diffusion.anneal_steps=10", "diffusion.shift_logits=true"])):
        cfg = load_config(f"{REPO}/configs/tiny.yaml", SMALL + extra)
        m = build_model(cfg, 512, pre_process=True, post_process=True)
        init_weights(m, cfg, tp_rank=0, pp_rank=0)  # same seed -> same weights
        out[name] = (m.eval(), cfg)
    return out


def test_step0_adapted_model_equals_ar_model(models):
    """Same weights, causal mask at annealing step 0, shift on: the adapted model's
    prediction for token i is the AR model's next-token prediction from i-1."""
    from megatron.core.transformer.enums import AttnMaskType

    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.generate import logits_fn_for
    from dlm_megatron.model.denoiser import attn_mask_type_for

    (ar, ar_cfg), (adp, cfg) = models["ar"], models["adapted"]
    assert attn_mask_type_for(cfg) == AttnMaskType.arbitrary and attn_mask_type_for(ar_cfg) == AttnMaskType.causal
    x = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ar_logits = ar(x, None, None)
        mask0 = ad.annealed_mask(16, ad.anneal_fraction(0, cfg.diffusion.anneal_steps), cfg.train.seed, 0)
        adp_logits = adp(x, None, mask0)
    torch.testing.assert_close(adp_logits, ar_logits, rtol=0, atol=1e-6)
    # Shifted readout: logits for token i come from output i-1 (= AR's next-token logits).
    shifted = ad.shift_logits(adp_logits)
    torch.testing.assert_close(shifted[:, 1:], ar_logits[:, :-1], rtol=0, atol=1e-6)
    # The trained objective agrees: on a clean input its per-token NLL equals AR's.
    obj_ar = build_objective(ar_cfg.diffusion, 511, ar_cfg.train.seed)
    b_ar = obj_ar.make_batch(x, torch.arange(2), step=0, global_batch_size=2)
    b = build_objective(cfg.diffusion, 511, cfg.train.seed).make_batch(x, torch.arange(2), step=0, global_batch_size=2)
    assert torch.equal(b.attention_mask, mask0) and torch.equal(b.labels_BS[:, :-1], b_ar.labels_BS[:, :-1])
    with torch.no_grad():
        nll_ar = ar(x, None, None, labels=b_ar.labels_BS)
        nll = adp(x, None, b.attention_mask, labels=b.labels_BS)
    torch.testing.assert_close(nll[:, :-1], nll_ar[:, :-1], rtol=0, atol=1e-6)
    # Sampler readout applies the same shift (with full attention: the adapted end state).
    fn = logits_fn_for(adp, 500, shift=True)
    with torch.no_grad():
        full = adp(x, None, None)
    torch.testing.assert_close(fn(x)[:, 1:], full[:, :-1, :500], rtol=0, atol=1e-6)
    # Past step 0 the mask is no longer causal and the models differ.
    with torch.no_grad():
        half = adp(x, None, ad.annealed_mask(16, 0.5, cfg.train.seed, 5))
    assert (half - ar_logits).abs().max() > 1e-4


@pytest.mark.e2e
def test_cli_ar_then_annealed_masked(tmp_path):
    """Train `ar` 3 steps, then adapt with init_from + anneal_steps through the CLI."""
    base = [PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES]
    ar = tmp_path / "ar"
    run(base + ["diffusion.objective=ar", "train.steps=3", f"train.output_dir={ar}"], timeout=600, env=env())
    out = tmp_path / "adapt"
    p = run(base + ["diffusion.objective=masked", f"train.init_from={ar}", "diffusion.anneal_steps=3",
                    "diffusion.shift_logits=true", "train.steps=4", f"train.output_dir={out}",
                    "train.sample_at_end=true", "generate.gen_length=8", "generate.steps=8", "generate.block_length=8"],
            timeout=600, env=env())
    assert "initialised weights from" in p.stdout
    assert "---- sample ----" in p.stdout
    rows = [r for r in metrics(out) if r.get("split") != "val"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and r["loss"] < 50 for r in rows)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"


@pytest.mark.distributed
def test_tp2_equals_tp1_with_annealed_mask_and_shift(tmp_path):
    import json

    res = tmp_path / "tp.json"
    run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/distributed/check_tp.py", str(res), "masked", "diffusion.anneal_steps=2", "diffusion.shift_logits=true"],
        timeout=600, env=env())
    r = json.loads(res.read_text())
    assert abs(r["loss_tp1"] - r["loss_tp2"]) < 1e-5, r
    assert r["max_grad_diff"] < 1e-5 and r["max_grad"] > 1e-3, r
