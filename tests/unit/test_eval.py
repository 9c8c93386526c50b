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

    def forward(self, tokens, pos, mask, labels=None, explicit_positions=False, loss_index=None):
        h = self.emb[tokens]
        if self.causal:
            h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1)[None, :, None]
        else:
            h = h + h.mean(1, keepdim=True)
        logits = h @ self.out
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
    for c, v in zip(cands, many):
        assert v == pytest.approx(want[c], abs=0.25 + 0.05 * abs(want[c])), (c, v, want[c])
    # The likelier answer scores higher (d > hd > fgh: about 1 nat apart or more).
    assert many[cands.index("d")] > many[cands.index("hd")] > many[cands.index("fgh")], (many, want)
    for obj in ("masked", "uniform", "hybrid", "ar"):
        a = ev.score_candidates(m, tok, prompt, cands, 16, seed=1, objective=obj)
        b = ev.score_candidates(m, tok, prompt, cands, 16, seed=1, objective=obj)
        assert a == b and all(math.isfinite(v) and v <= 1e-9 for v in a), (obj, a)
        if obj != "ar":
            assert ev.score_candidates(m, tok, prompt, cands, 16, seed=2, objective=obj) != a, obj
    assert ev.score_candidates(m, tok, prompt, ["", "de"], 4)[0] == float("-inf")  # nothing to score


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

    def forward(self, tokens, pos, mask, labels=None, explicit_positions=False, loss_index=None):
        self.masks.append(mask)
        h = self.emb[tokens]
        if mask is not None:
            vis = (~mask[:, 0]).to(h.dtype)                       # [B, S, S] 1 = may attend
            h = h + (vis @ h) / vis.sum(-1, keepdim=True)
        else:
            h = h + h.mean(1, keepdim=True)
        logits = h @ self.out
        if labels is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


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
