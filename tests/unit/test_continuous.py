"""Continuous (CDCD) diffusion: score formula vs closed forms, schedule, sampler, CLI
training (falling loss, bounded/non-collapsed embeddings), TP2 = TP1."""
from __future__ import annotations

import json
import math

import pytest
import torch

from common import env, COMMON_OVERRIDES, PY, REPO, run, train_losses

from dlm_megatron.diffusion import continuous as cd


def _table(V=6, H=8, seed=0):
    return cd.normalise(torch.randn(V, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_normalise_gives_norm_sqrt_d():
    E = _table(10, 16)
    torch.testing.assert_close(E.norm(dim=-1), torch.full((10,), 4.0, dtype=torch.float64))


def test_score_equals_gaussian_mixture_score():
    """With the exact posterior p(v|x) of x = e_v + sigma n, E[x0] = p @ E and
    (E[x0] - x)/sigma^2 is grad_x log sum_v pi_v N(x; e_v, sigma^2 I) (Tweedie)."""
    E = _table()
    prior = torch.tensor([0.1, 0.3, 0.05, 0.25, 0.2, 0.1], dtype=torch.float64)
    for sigma in (0.3, 1.0, 5.0):
        x = (E[2] + sigma * torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        x = x[None, None].clone().requires_grad_(True)
        logp = torch.logsumexp(prior.log() - ((x[..., None, :] - E) ** 2).sum(-1) / (2 * sigma ** 2), dim=-1).sum()
        (grad,) = torch.autograd.grad(logp, x)
        post = cd.mixture_posterior(x.detach(), E, sigma, prior)
        s = cd.score(x.detach(), cd.expected_embedding(post, E), sigma)
        torch.testing.assert_close(s, grad, rtol=1e-9, atol=1e-9)


def test_one_hot_posterior_score_and_euler_are_exact():
    """A one-hot posterior: E[x0] = e_v and the score is the Gaussian's (e_v - x)/sigma^2; the
    ODE solution x(s) = e_v + (x - e_v) s / sigma is linear in s, so Euler is exact."""
    E = _table()
    probs = torch.zeros(1, 1, 6, dtype=torch.float64)
    probs[..., 4] = 1.0
    ex0 = cd.expected_embedding(probs, E)
    torch.testing.assert_close(ex0[0, 0], E[4])
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 10
    torch.testing.assert_close(cd.score(x, ex0, 10.0), (E[4] - x) / 100.0)
    for s_next in (5.0, 1.0, 0.01):
        torch.testing.assert_close(cd.euler_step(x, ex0, 10.0, s_next), E[4] + (x - E[4]) * s_next / 10.0)


def test_schedules_range_and_monotone():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = cd.sigma_from_uniform(u, 1.0, 300.0)
    assert math.isclose(s[0].item(), 1.0) and math.isclose(s[-1].item(), 300.0, rel_tol=1e-12)
    assert (s[1:] > s[:-1]).all()
    torch.testing.assert_close(torch.log(s), torch.linspace(0, math.log(300.0), 101, dtype=torch.float64))
    for rho in (0.0, 7.0):
        g = cd.sampling_sigmas(10, 0.5, 80.0, rho)
        assert len(g) == 11 and math.isclose(g[0].item(), 80.0) and math.isclose(g[-1].item(), 0.5)
        assert (g[1:] < g[:-1]).all()
    torch.testing.assert_close(cd.c_in(torch.tensor([0.0, 1.0])), torch.tensor([1.0, 2 ** -0.5]))


def test_objective_noise_is_per_sample_and_in_range():
    from dlm_megatron.config import DiffusionConfig
    from dlm_megatron.diffusion.objectives import build_objective

    obj = build_objective(DiffusionConfig(objective="continuous", sigma_min=0.5, sigma_max=50.0), mask_id=0, seed=3)
    x0 = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    b = obj.make_batch(x0, torch.arange(10, 14), step=0, global_batch_size=4)
    assert torch.equal(b.labels_BS, x0) and (b.loss_weight_BS == 1).all()
    sig = b.model_kwargs["sigma_B"]
    assert ((sig >= 0.5) & (sig <= 50.0)).all()
    # A sample's noise depends on its global position only (not on batch split / rank).
    b2 = obj.make_batch(x0[2:], torch.arange(12, 14), step=0, global_batch_size=4)
    assert torch.equal(b2.model_kwargs["sigma_B"], sig[2:]) and torch.equal(b2.model_kwargs["noise_seed_B"], b.model_kwargs["noise_seed_B"][2:])


@pytest.fixture(scope="module")
def model():
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist

    ov = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=192",
          "data.seq_len=16", "diffusion.objective=continuous", "diffusion.sigma_min=0.5", "diffusion.sigma_max=20"]
    cfg = load_config(f"{REPO}/configs/tiny.yaml", ov)
    pdist.init_distributed(cfg)
    m = build_model(cfg, 512, pre_process=True, post_process=True)
    init_weights(m, cfg, tp_rank=0, pp_rank=0)
    return m.eval(), cfg


def test_model_noisy_input_paths_agree(model):
    """The training path (noise from seeds) equals the sampler path (explicit x)."""
    m, cfg = model
    x0 = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.7, 9.0])
    seeds = torch.tensor([11, 12])
    with torch.no_grad():
        a = m(x0, None, None, sigma_B=sig, noise_seed_B=seeds)
        x = m.clean_embeddings(x0) + sig[:, None, None] * cd.noise_for(seeds, 16, 64)
        b = m(torch.zeros_like(x0), None, None, sigma_B=sig, noisy_x_BSH=x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert "time_embedding.proj.weight" in dict(m.named_parameters())


def test_sampler_deterministic_and_keeps_prompt(model):
    from dlm_megatron.sampling.continuous import ContinuousSamplerConfig, generate_continuous

    m, cfg = model
    prompt = torch.tensor([[5, 6, 7]])
    c = ContinuousSamplerConfig(steps=6, gen_length=8, sigma_min=0.5, sigma_max=20.0, seed=4)
    out1, traj = generate_continuous(m, prompt, 500, c, return_trajectory=True)
    out2 = generate_continuous(m, prompt, 500, c)
    assert out1.shape == (1, 11) and torch.equal(out1, out2) and torch.equal(out1[:, :3], prompt)
    assert len(traj) == 6 and ((out1 >= 0) & (out1 < 500)).all()
    out3, traj3 = generate_continuous(m, prompt, 500, ContinuousSamplerConfig(**dict(c.__dict__, seed=5)), return_trajectory=True)
    assert out3.shape == out1.shape and torch.equal(out3[:, :3], prompt)
    # Another seed is another draw: the trajectory and the generated tokens change.
    assert not torch.allclose(traj3[0], traj[0])
    assert not torch.equal(out3[:, 3:], out1[:, 3:]), "the seed does not change the sample"


def test_model_embeddings_are_normalised(model):
    """The model's own clean embeddings (training path) and its table (sampler path) have
    norm sqrt(H) per token, agree with each other, and differ from the raw (learned) rows."""
    m, cfg = model
    H = cfg.model.hidden_size
    ids = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e = m.clean_embeddings(ids)
        table = m.normalised_embedding_table()
        raw = m.embedding.word_embeddings.weight
    torch.testing.assert_close(e.norm(dim=-1), torch.full((3, 16), math.sqrt(H)))
    torch.testing.assert_close(table.norm(dim=-1), torch.full((table.shape[0],), math.sqrt(H)))
    torch.testing.assert_close(e, table[ids])
    assert (raw.norm(dim=-1) - math.sqrt(H)).abs().min() > 1.0  # init std 0.02: the raw rows are far from sqrt(H)


class _ExactDenoiser:
    """A perfect denoiser for data where position s holds token 2s or 2s+1 (prob. 1/2 each):
    its logits are the exact Gaussian-mixture log-posterior (cd.mixture_posterior)."""

    def __init__(self, E_VH, S):
        import types

        self.E, self.S = E_VH, S
        self.config = types.SimpleNamespace(params_dtype=torch.float64)
        prior = torch.full((S, E_VH.shape[0]), 1e-30, dtype=torch.float64)
        for s_ in range(S):
            prior[s_, 2 * s_: 2 * s_ + 2] = 0.5
        self.prior = prior

    def normalised_embedding_table(self):
        return self.E

    def __call__(self, ids, pos, mask, *, sigma_B, noisy_x_BSH):
        sigma = float(sigma_B[0])
        d2 = ((noisy_x_BSH[..., None, :] - self.E) ** 2).sum(-1)
        return self.prior.log() - d2 / (2 * sigma ** 2)


def test_sampler_with_exact_score_lands_on_the_data():
    """Integrating the exact probability-flow ODE ends on the data manifold: every position
    is one of its two allowed tokens, and different seeds pick different modes."""
    from dlm_megatron.sampling.continuous import ContinuousSamplerConfig, generate_continuous

    S, H = 6, 16
    E = cd.normalise(torch.randn(2 * S, H, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    m = _ExactDenoiser(E, S)
    outs = set()
    for seed in range(6):
        c = ContinuousSamplerConfig(steps=50, gen_length=S, sigma_min=0.05, sigma_max=30.0, rho=7.0, seed=seed)
        out = generate_continuous(m, torch.zeros(1, 0, dtype=torch.long), 2 * S, c)[0]
        assert all(int(out[i]) in (2 * i, 2 * i + 1) for i in range(S)), out
        outs.add(tuple(out.tolist()))
    assert len(outs) > 1


@pytest.mark.e2e
def test_cli_loss_falls_embeddings_bounded_and_generates(tmp_path):
    from dlm_megatron.checkpoint import load_full_state_dict, resolve

    out = tmp_path / "cont"
    run([PY, "-m", "dlm_megatron.train", "configs/tiny.yaml", *COMMON_OVERRIDES, "diffusion.objective=continuous",
         "diffusion.sigma_min=0.5", "diffusion.sigma_max=50", "train.steps=20", f"train.output_dir={out}"], timeout=600, env=env())
    losses = train_losses(out)
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    W = load_full_state_dict(resolve(str(out)))["embedding.word_embeddings.weight"].float()
    raw = W.norm(dim=-1)
    assert torch.isfinite(raw).all() and raw.min() > 1e-3 and raw.max() < 10.0  # no blow-up / vanishing rows
    from dlm_megatron.generate import load_model

    m, _, _, _ = load_model(str(out))
    with torch.no_grad():
        E = m.normalised_embedding_table()[:500].float()  # what the model trains and samples with
    torch.testing.assert_close(E.norm(dim=-1), torch.full((500,), 8.0))
    cos = (E @ E.T / 64.0).fill_diagonal_(0)
    assert cos.abs().mean() < 0.5, "embeddings collapsed together"
    p = run([PY, "-m", "dlm_megatron.generate", "--ckpt", str(out), "--prompt", "ROMEO:", "--gen-length", "8",
             "--steps", "8", "--block-length", "8"], timeout=300, env=env())
    assert p.stdout.strip().startswith("ROMEO")


@pytest.mark.distributed
def test_tp2_equals_tp1(tmp_path):
    res = tmp_path / "tp.json"
    run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/distributed/check_tp.py", str(res), "continuous"], timeout=600, env=env())
    r = json.loads(res.read_text())
    assert abs(r["loss_tp1"] - r["loss_tp2"]) < 1e-5, r
    assert r["max_grad_diff"] < 1e-5 * max(1.0, r["max_grad"]) + 1e-6, r
