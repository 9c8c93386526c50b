"""dlm_megatron.eval with a fake denoiser (no megatron): determinism, stratification, exact AR
NLL, candidate scoring, and the uniform ancestral sampler."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dlm_megatron import eval as ev
from dlm_megatron.diffusion.objectives import build_objective
from dlm_megatron.sampling.uniform import generate_uniform

V, MASK, EOT = 12, 1, 0


class FakeModel(torch.nn.Module):
    """Bidirectional bag-of-tokens denoiser with megatron's call signature."""

    def __init__(self, causal=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(V, 8, generator=g))
        self.out = torch.nn.Parameter(torch.randn(8, 16, generator=g))  # 16 = padded vocab
        self.causal = causal

    def mix(self, h, mask):
        """Each position's hidden state after 'attention' (the mask is ignored here)."""
        if self.causal:
            return h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[None, :, None]
        return h + h.mean(1, keepdim=True)

    def forward(self, tokens, pos, mask, labels=None, explicit_positions=False, loss_index=None):
        logits = self.mix(self.emb[tokens], mask) @ self.out
        if labels is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def dcfg(**kw):
    d = dict(objective="masked", eps=1e-3, antithetic=True, random_length_prob=0.0, p_uniform=0.3, block_size=4, t_min=0.0, t_max=1.0)
    d.update(kw)
    return SimpleNamespace(**d)


def windows(n=3, L=8):
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, V, (n, L), generator=g)


def test_diffusion_bound_is_deterministic_and_stratified():
    for name in ("masked", "uniform", "hybrid"):
        obj = build_objective(dcfg(objective=name), MASK, 5, vocab_size=V)
        x = windows()
        r1 = ev.diffusion_bound(FakeModel(), obj, x, num_samples=4, batch_size=3)
        r2 = ev.diffusion_bound(FakeModel(), obj, x, num_samples=4, batch_size=16)  # batching does not matter
        assert torch.allclose(r1["loss"], r2["loss"], atol=1e-6) and torch.equal(r1["t"], r2["t"])
        # stratified: each window's K levels are (o + k/K) mod 1, one per quarter of (eps, 1)
        u = ((r1["t"] - 1e-3) / (1 - 1e-3)).sort(dim=1).values
        assert torch.allclose(u[:, 1:] - u[:, :-1], torch.full((3, 3), 0.25, dtype=u.dtype), atol=1e-5)
        other = build_objective(dcfg(objective=name), MASK, 6, vocab_size=V)
        assert not torch.equal(ev.diffusion_bound(FakeModel(), other, x, num_samples=4, batch_size=16)["t"], r1["t"])


def test_summarize_bound_standard_error():
    loss = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.05, 0.55], [0.15, 0.95]], dtype=torch.float64)
    s = ev.summarize_bound(loss, t, 10)
    assert s["nll"] == 2.0
    assert math.isclose(s["se"], math.sqrt((2.0 + 0.0) / 2) / 2)
    assert [b[2] for b in s["buckets"]] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]


def test_ar_nll_is_exact():
    m = FakeModel(causal=True)
    x = windows()
    total, count = ev.ar_nll(m, x, batch_size=2)
    logits = m(x, None, None)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 16), x[:, 1:].reshape(-1), reduction="sum").item()
    assert count == 3 * 7 and math.isclose(total, want, rel_tol=1e-6)


class FakeTok:
    vocab_size, mask_id, eot_id = V, MASK, EOT

    def encode(self, s):
        return [2 + (ord(c) % (V - 2)) for c in s]


class PositionModel(torch.nn.Module):
    """A denoiser whose logits depend on the position only (never on the tokens): under it
    the answer's tokens are independent, so log p(answer | prompt) = sum_i log p_i(a_i)
    exactly, and the masked bound E_t[(1/t) sum_masked log p_i(a_i)] is unbiased for it
    (E[1(u < t) / t] = 1 for t ~ U(eps, 1), u ~ U(0, 1))."""

    def __init__(self):
        super().__init__()
        self.table = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)) * 2.0

    def forward(self, tokens, pos, mask, labels=None, explicit_positions=False, loss_index=None):
        return self.table[: tokens.shape[1]][None].expand(tokens.shape[0], -1, -1)


def test_score_candidates_deterministic_and_sane():
    """Scores are log-likelihoods of the answer given the prompt: the exact one for ar, an
    unbiased Monte Carlo estimate of it for masked; the likelier answer scores higher; the
    seed (and only the seed) fixes the noise."""
    m = PositionModel()
    tok = FakeTok()
    prompt, cands = "abc", ["de", "fgh", "d", "hd"]
    P = len(tok.encode(prompt))
    logp = torch.log_softmax(m.table[:, :V], -1)

    def exact(c, shift):  # sum of log p_i(a_i) at the answer's positions (ar: read from position i - 1)
        ids = tok.encode(c)
        return sum(logp[P + i - shift, a].item() for i, a in enumerate(ids))

    want = {c: exact(c, 0) for c in cands}
    ar = ev.score_candidates(m, tok, prompt, cands, 8, seed=1, objective="ar")
    assert ar == pytest.approx([exact(c, 1) for c in cands], abs=1e-5)
    many = ev.score_candidates(m, tok, prompt, cands, 4096, seed=0)
    # Monte Carlo error at 4096 samples, measured over 12 seeds: standard deviation 0.038 at
    # most (fgh; de 0.027, hd 0.012, d exact: one token is always masked), so 0.15 is 4 of them;
    # a 5% bias (0.15 to 0.5 nats on these answers) does not pass everywhere.
    for c, v in zip(cands, many):
        assert v == pytest.approx(want[c], abs=0.15), (c, v, want[c])
    # The likelier answer scores higher (d > hd > fgh: about 1 nat apart or more).
    assert many[cands.index("d")] > many[cands.index("hd")] > many[cands.index("fgh")], (many, want)
    for obj in ("masked", "uniform", "hybrid", "ar"):
        a = ev.score_candidates(m, tok, prompt, cands, 16, seed=1, objective=obj)
        b = ev.score_candidates(m, tok, prompt, cands, 16, seed=1, objective=obj)
        assert a == b and all(math.isfinite(v) and v <= 1e-9 for v in a), (obj, a)
        if obj != "ar":
            assert ev.score_candidates(m, tok, prompt, cands, 16, seed=2, objective=obj) != a, obj
    assert ev.score_candidates(m, tok, prompt, ["", "de"], 4)[0] == float("-inf")  # nothing to score


# ------------------------------------------------------------- LLaDA's estimator for --choices

def _subsets(L):
    import itertools

    return [S for n in range(1, L + 1) for S in itertools.combinations(range(L), n)]


def _exact_bound(m, x, P, L, shift=False):
    """The conditional bound computed independently of dlm_megatron.eval: every nonempty set S
    of masked answer positions, f(S) = sum_{i in S} log p(a_i | prompt, a_{-S}) read off the
    model, weighted by its continuous-time weight int_0^1 (1/t) t^|S| (1-t)^(L-|S|) dt =
    B(|S|, L-|S|+1). Also returns {S: f(S)}.  (float64 sums of float32 log-probabilities)"""
    total, f = 0.0, {}
    for S in _subsets(L):
        xs = x.clone()
        xs[[P + i for i in S]] = MASK
        logp = torch.log_softmax(m(xs[None], None, None)[0, :, :V].double(), -1)
        f[S] = sum(logp[P + i - (1 if shift else 0), x[P + i]].item() for i in S)
        n = len(S)
        total += math.exp(math.lgamma(n) + math.lgamma(L - n + 1) - math.lgamma(L + 1)) * f[S]
    return total, f


def test_llada_estimator_expectation_equals_exact_bound():
    """Exact: the estimator's expectation, enumerated through its own sampler (l from each of
    the L equally likely strata of u, the mask from each of the L! equally likely orders of
    the token uniforms) and its own per-sample values, equals the bound enumerated over all
    2^L - 1 masks with Beta weights (a context-dependent toy model, so f is not additive and
    the per-count weights matter). Its per-sample variance is below the 1/t estimator's."""
    import itertools

    from dlm_megatron.diffusion import masked as md

    m, tok = FakeModel(), FakeTok()
    p_ids, a_ids = tok.encode("abc"), tok.encode("dfgh")
    x, P, L = torch.tensor(p_ids + a_ids), len(p_ids), len(a_ids)
    exact, f = _exact_bound(m, x, P, L)
    perms = torch.tensor(list(itertools.permutations(range(L))), dtype=torch.float64) / L  # every order of L uniforms
    u = (torch.arange(L, dtype=torch.float64) + 0.5) / L                                # one u per stratum of l
    l_K = md.num_masked_from_uniform(u.repeat_interleave(len(perms)), L)
    assert l_K.tolist() == [l for l in range(1, L + 1) for _ in perms]
    masks = md.mask_exactly(perms.repeat(L, 1), l_K)
    assert torch.equal(masks.sum(1), l_K)
    terms = ev.llada_terms(m, x, P, masks, md.exact_count_weights(l_K, L), mask_id=MASK, vocab_size=V)
    assert terms.mean().item() == pytest.approx(exact, abs=1e-5), (terms.mean().item(), exact)
    # every l-subset equally often given l (uniform subsets), each value (L/l) f(S)
    for l in range(1, L + 1):
        rows = [tuple(torch.nonzero(r).flatten().tolist()) for r in masks[l_K == l]]
        assert sorted(set(rows)) == [S for S in _subsets(L) if len(S) == l]
        assert len({rows.count(S) for S in set(rows)}) == 1
    for r, v in zip(masks, terms):
        S = tuple(torch.nonzero(r).flatten().tolist())
        assert v.item() == pytest.approx(L / len(S) * f[S], abs=1e-5)
    # Per-sample variance, both exact: LLaDA's E[v^2] - exact^2 against the 1/t form's
    # sum_S f(S)^2 int_eps^1 t^(|S|-2) (1-t)^(L-|S|) dt / (1 - eps) - mean^2 (log-spaced quadrature).
    var_llada = (terms ** 2).mean().item() - terms.mean().item() ** 2
    t = torch.logspace(-3, 0, 200001, dtype=torch.float64)
    second = sum(f[S] ** 2 * torch.trapezoid(t ** (len(S) - 2) * (1 - t) ** (L - len(S)), t).item() for S in f) / (1 - 1e-3)
    var_t = second - exact ** 2
    print(f"per-sample variance: LLaDA {var_llada:.3f}, 1/t {var_t:.3f} (exact bound {exact:.4f})")
    assert var_llada < 0.5 * var_t, (var_llada, var_t)


def test_llada_estimator_monte_carlo_within_standard_error():
    """score_candidates end to end (sampler, masks, weights, stratified l): the mean score over
    400 seeds is within 4 standard errors (the spread of the 400 scores / sqrt(400)) of the
    exact bound; each sample masks exactly l answer tokens, with K = 8 samples covering
    l = 1..4 twice (stratified)."""
    m, tok = FakeModel(), FakeTok()
    p_ids, a_ids = tok.encode("abc"), tok.encode("dfgh")
    x, P, L = torch.tensor(p_ids + a_ids), len(p_ids), len(a_ids)
    exact, f = _exact_bound(m, x, P, L)
    scores = torch.tensor([ev.score_candidates(m, tok, "abc", ["dfgh"], 8, seed=r)[0] for r in range(400)], dtype=torch.float64)
    se = scores.std().item() / 20
    assert abs(scores.mean().item() - exact) < 4 * se, (scores.mean().item(), exact, se)
    assert se < 0.05 * abs(exact)  # the check is not vacuous
    seen = []

    class Recorder(FakeModel):
        def forward(self, tokens, *a, **k):
            seen.append(tokens.clone())
            return super().forward(tokens, *a, **k)

    ev.score_candidates(Recorder(), tok, "abc", ["dfgh"], 8, seed=0)
    counts = (seen[0][:, P:] == MASK).sum(1)
    assert sorted(counts.tolist()) == [1, 1, 2, 2, 3, 3, 4, 4] and not (seen[0][:, :P] == MASK).any()


def test_shifted_model_scores_equal_hand_computation():
    """diffusion.shift_logits: answer token i is read at output i-1. One-token answers are
    deterministic (l = 1, weight 1): log p(a | prompt, MASK) at the last prompt position. A
    two-token answer's per-sample values are, by hand, 2 log p(a_0 | [M, a_1]) (output P-1),
    2 log p(a_1 | [a_0, M]) (output P), or log p(a_0 | [M, M]) + log p(a_1 | [M, M])."""
    m, tok = FakeModel(), FakeTok()
    prompt = "abc"
    p_ids = tok.encode(prompt)
    P = len(p_ids)

    def logp(seq, out_pos, target):
        return torch.log_softmax(m(torch.tensor(seq)[None], None, None)[0, out_pos, :V].double(), -1)[target].item()

    for c in ("d", "g"):
        a = tok.encode(c)[0]
        hand = logp(p_ids + [MASK], P - 1, a)
        got = ev.score_candidates(m, tok, prompt, [c], 16, seed=3, shift=True)[0]
        assert got == pytest.approx(hand, abs=1e-5)
        assert abs(ev.score_candidates(m, tok, prompt, [c], 16, seed=3)[0] - got) > 1e-3  # unshifted reads output P
    a0, a1 = tok.encode("dh")
    one = {0: 2 * logp(p_ids + [MASK, a1], P - 1, a0), 1: 2 * logp(p_ids + [a0, MASK], P, a1)}
    both = logp(p_ids + [MASK, MASK], P - 1, a0) + logp(p_ids + [MASK, MASK], P, a1)
    terms = ev.score_candidates(m, tok, prompt, ["dh"], 8, seed=5, shift=True, return_terms=True)[0]
    assert sum(any(abs(v - h) < 1e-5 for h in one.values()) for v in terms.tolist()) == 4
    assert sum(abs(v - both) < 1e-5 for v in terms.tolist()) == 4
    exact, _ = _exact_bound(m, torch.tensor(p_ids + [a0, a1]), P, 2, shift=True)
    assert exact == pytest.approx(0.25 * (one[0] + one[1]) + 0.5 * both, abs=1e-9)
    with pytest.raises(ev.EvalDataError, match="non-empty prompt"):
        ev.score_candidates(m, tok, "", ["dh"], 8, shift=True)


def test_generate_uniform_deterministic_and_keeps_prompt():
    m = FakeModel()
    fn = lambda x: m(x, None, None)
    prompt = torch.tensor([[3, 4, 5]])
    for pu in (1.0, 0.3):
        a = generate_uniform(fn, prompt, mask_id=MASK, vocab_size=V, gen_length=6, steps=5, p_uniform=pu, seed=2)
        b = generate_uniform(fn, prompt, mask_id=MASK, vocab_size=V, gen_length=6, steps=5, p_uniform=pu, seed=2)
        assert torch.equal(a, b) and torch.equal(a[:, :3], prompt)
        assert ((a[:, 3:] != MASK) & (a[:, 3:] < V)).all()  # the last step leaves clean tokens only


def test_jsonl_inputs_name_the_bad_line(tmp_path):
    """Eval documents, eval choices and SFT data report a broken line by its line number in
    the file (blank lines counted), as one line of the reader's own error type."""
    import pytest

    from dlm_megatron.data import DataError
    from dlm_megatron.data.sft import SFTDataset

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "prompt": "p", "response": "r"}\n\n{"text": \n')
    for read, err in ((lambda: ev.read_documents(str(bad)), ev.EvalDataError),
                      (lambda: SFTDataset(bad, None, 16), DataError)):
        with pytest.raises(err, match=rf"^{bad}:3 is not valid JSON$"):
            read()
    bad.write_text('{"prompt": "p", "choices": ["a"], "answer": 0}\n\n{"prompt": \n')
    with pytest.raises(ev.EvalDataError, match=rf"^{bad}:3 is not valid JSON$"):
        ev.read_choices(str(bad))


class MaskRecorder(FakeModel):
    """FakeModel that attends only where the mask allows (mean over visible keys) and
    records the masks it is given."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def mix(self, h, mask):
        self.masks.append(mask)
        if mask is None:
            return super().mix(h, mask)
        vis = (~mask[:, 0]).to(h.dtype)                       # [B, S, S] 1 = may attend
        return h + (vis @ h) / vis.sum(-1, keepdim=True)


def test_document_masks_reach_the_model_in_eval():
    """token_windows numbers the documents of each window (a document's EOT is its own, a
    window starts at 0); diffusion_bound and ar_nll hand the model exactly the
    block-diagonal document masks (causal for ar), and the bound changes with them."""
    class Tok(FakeTok):
        def encode_batch(self, docs):
            return [self.encode(d) for d in docs]

    x, seg = ev.token_windows(["abc", "de", "fghij", "k"], Tok(), 5, None, with_segments=True)
    t = lambda c: 2 + ord(c) % (V - 2)  # FakeTok's ids
    assert x.tolist() == [[t("a"), t("b"), t("c"), EOT, t("d")], [t("e"), EOT, t("f"), t("g"), t("h")],
                          [t("i"), t("j"), EOT, t("k"), EOT]]
    assert seg.tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert torch.equal(ev.token_windows(["abc", "de", "fghij", "k"], Tok(), 5, None), x)
    obj = build_objective(dcfg(), MASK, 5, vocab_size=V)
    m = MaskRecorder()
    with_masks = ev.diffusion_bound(m, obj, x, num_samples=4, batch_size=3, segment_ids_NL=seg)["loss"]
    want = [(seg[i][:, None] != seg[i][None, :]) for i in range(3) for _ in range(4)]  # window i, K=4 copies, True = blocked
    got = torch.cat([mk[:, 0] for mk in m.masks])
    assert torch.equal(got, torch.stack(want))
    plain = ev.diffusion_bound(MaskRecorder(), obj, x, num_samples=4, batch_size=3)["loss"]
    assert (with_masks - plain).abs().max() > 1e-4
    m = MaskRecorder()
    ev.ar_nll(m, x, batch_size=2, segment_ids_NL=seg)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    got = torch.cat([mk[:, 0] for mk in m.masks])
    assert torch.equal(got, torch.stack([(seg[i][:, None] != seg[i][None, :]) | causal for i in range(3)]))


def test_eval_cli_passes_shift_and_choice_sample_count(monkeypatch, tmp_path):
    """eval --choices hands score_candidates the checkpoint's diffusion.shift_logits and, without
    --num-samples, 128 samples (LLaDA's count); --data keeps 8 by default."""
    import dlm_megatron.generate as gen

    ch = tmp_path / "mc.jsonl"
    ch.write_text('{"prompt": "abc", "choices": ["d", "fg"], "answer": 1}\n')
    calls = []
    for shift in (True, False):
        cfg = SimpleNamespace(diffusion=SimpleNamespace(objective="masked", eps=1e-3, p_uniform=0.1, shift_logits=shift))
        monkeypatch.setattr(gen, "load_model", lambda *a, cfg=cfg: (FakeModel(), FakeTok(), cfg, {}))
        monkeypatch.setattr(ev, "score_candidates", lambda *a, **k: calls.append((a, k)) or [0.0, 1.0])
        for extra in ([], ["--num-samples", "16"]):
            lines = ev.run(ev.build_parser().parse_args(["--ckpt", "x", "--choices", str(ch), *extra]))
            assert lines[-1] == "accuracy 1.0000 (1/1)"
    assert [(a[4], k["shift"]) for a, k in calls] == [(128, True), (16, True), (128, False), (16, False)]
    assert ev.build_parser().parse_args(["--ckpt", "x"]).num_samples is None and ev.DATA_SAMPLES == 8
