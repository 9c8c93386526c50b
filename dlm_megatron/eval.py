"""Likelihood evaluation: ``python -m dlm_megatron.eval --ckpt PATH --data FILE`` (``dlm-eval``).

Diffusion checkpoints (masked, block, uniform, hybrid, and any other registered diffusion
objective): the negative ELBO per token, an upper bound on the NLL, estimated by Monte Carlo
over the noise level t with K stratified ("antithetic") samples per sequence: t_k =
eps + (1 - eps) * ((o + k/K) mod 1) with one random offset o per sequence (MDLM's
low-discrepancy sampler, Sahoo et al. 2024). Printed with its Monte Carlo standard error, the
implied perplexity bound exp(nll), and the loss per noise-level bucket t in [0, 0.1), ...
(the bound is the mean over the buckets; where the loss sits shows which noise levels the
model finds hard). The noise is the training objective's own ``make_batch`` in its
validation stream, keyed by (--seed, sequence index, sample index): deterministic.

``ar`` checkpoints: the exact perplexity, exp(mean next-token NLL) over non-overlapping windows.

Multiple-choice scoring (``--choices FILE.jsonl``, lines {"prompt", "choices", "answer"}):
masked checkpoints score each candidate answer a (L tokens) with LLaDA's lower-variance
estimator of the conditional bound (Nie et al. 2025, Eq. 6):
log p(a | prompt) >= E_{l ~ U{1..L}} [ (L/l) sum_{i masked} log p_theta(a_i | prompt, a_l) ]
where exactly l answer tokens (a uniformly random subset) are masked and the prompt stays
clean; ``--num-samples`` samples (default 128 for --choices) per candidate. A model trained
with diffusion.shift_logits reads token i from output i-1. Uniform and hybrid checkpoints use
their ELBO integrand at stratified t, AR checkpoints the exact log-likelihood. The
highest-scoring candidate is the prediction; accuracy is printed last.

The last line of the output is ``perplexity_bound X`` (diffusion), ``perplexity X`` (ar)
or ``accuracy X`` (--choices): scripts can read the number with ``tail -1 | awk '{print $2}'``.
Errors (missing file, empty data, bad checkpoint) are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

from .data.jsonl import jsonl_records

NUM_BUCKETS = 10
DATA_SAMPLES = 8      # --num-samples default for --data: samples of t per window
CHOICE_SAMPLES = 128  # --num-samples default for --choices: LLaDA's Monte Carlo count per answer


# --------------------------------------------------------------------------------------------
# Data


class EvalDataError(ValueError):
    pass


def read_documents(path: str, field: str = "text") -> list[str]:
    """Documents of a plain-text file (one document) or a JSONL file (``field`` of each line)."""
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"data file '{path}' does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    is_jsonl = p.suffix == ".jsonl"
    if not is_jsonl and lines:
        try:
            is_jsonl = isinstance(json.loads(lines[0]), dict)
        except ValueError:
            is_jsonl = False
    if not is_jsonl:
        return [text] if text.strip() else []
    docs = []
    for n, obj in jsonl_records(text, path, EvalDataError):
        if not isinstance(obj, dict) or field not in obj:
            raise EvalDataError(f"{path}:{n} has no field '{field}' (choose one with --field)")
        if str(obj[field]).strip():
            docs.append(str(obj[field]))
    return docs


def token_windows(docs: list[str], tok, seq_len: int, max_tokens: int | None, multiple_of: int = 1, *,
                  with_segments: bool = False):
    """Documents joined as in training (each followed by EOT), cut into non-overlapping windows
    of ``seq_len`` tokens (the tail is dropped unless there is no full window: then one
    shorter window, trimmed to a multiple of ``multiple_of``).  -> [N, L] int64

    ``with_segments``: also return each position's document number counted from the window's
    start [N, L] (a document's EOT belongs to it, as in training's data.loader segment ids),
    for checkpoints trained with data.document_masks."""
    stream: list[int] = []
    doc_of: list[int] = []
    for d, ids in enumerate(tok.encode_batch(docs)):
        stream.extend(ids)
        stream.append(tok.eot_id)
        doc_of.extend([d] * (len(ids) + 1))
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream, doc_of = stream[:max_tokens], doc_of[:max_tokens]
    n = len(stream) // seq_len
    if n == 0:
        short = (len(stream) // multiple_of) * multiple_of
        if short < 2:
            raise EvalDataError(f"the data holds {len(stream)} tokens: too few to evaluate")
        n, seq_len = 1, short
    x = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if not with_segments:
        return x
    d = torch.tensor(doc_of[: n * seq_len], dtype=torch.int32).view(n, seq_len)
    return x, d - d[:, :1]


# --------------------------------------------------------------------------------------------
# Bounds


def cat_batches(batches: list):
    """Stack micro-batches of equal sequence length row-wise into one Batch."""
    from dataclasses import replace

    if len(batches) == 1:
        return batches[0]
    b0 = batches[0]
    cat = lambda name: None if getattr(b0, name) is None else torch.cat([getattr(b, name) for b in batches])
    return replace(b0, tokens_BS=cat("tokens_BS"), labels_BS=cat("labels_BS"), loss_weight_BS=cat("loss_weight_BS"),
                   t_B=cat("t_B"), position_ids_BS=cat("position_ids_BS"),
                   num_clean_tokens=sum(b.num_tokens for b in batches), **_kwargs_of(batches, lambda vs: torch.cat(vs)))


def _kwargs_of(batches: list, combine) -> dict:
    """Per-row model inputs (e.g. continuous diffusion's sigma_B) combined across batches."""
    mk = getattr(batches[0], "model_kwargs", None)
    if not mk:
        return {}
    return {"model_kwargs": {k: combine([b.model_kwargs[k] for b in batches]) for k in mk}}


@torch.no_grad()
def diffusion_bound(model, objective, x_NL: torch.Tensor, *, num_samples: int, batch_size: int, device="cpu",
                    segment_ids_NL: torch.Tensor | None = None) -> dict:
    """Per-token negative ELBO of every window, K stratified Monte Carlo samples each.

    Sequence i is replicated K times as "global batch" ``i`` of size K, so the objective's
    antithetic sampler gives its K copies the stratified levels (o_i + k/K) mod 1 and each
    copy its own mask (keyed by the global position i*K + k). ``segment_ids_NL`` (document
    number per position, see token_windows): attend within documents only, as a model
    trained with data.document_masks did.
    Returns dict(loss [N, K] per-token bound of each sample, t [N, K])."""
    from .data.loader import with_document_mask
    from .train import LossFn

    loss_fn = LossFn(torch.device(device))
    N, L = x_NL.shape
    K = num_samples
    per_seq = max(1, batch_size // K)
    losses, ts = [], []
    for lo in range(0, N, per_seq):
        bl = []
        for i in range(lo, min(N, lo + per_seq)):
            pos = torch.arange(i * K, (i + 1) * K, dtype=torch.long)
            bl.append(objective.make_batch(x_NL[i:i + 1].expand(K, L).clone(), pos, step=i, global_batch_size=K, eval=True))
        # rows of one window may exceed batch_size when K > batch_size: split them
        b = cat_batches(bl)
        rows = b.tokens_BS.shape[0]
        # row j of b is window lo + j // K
        seg_rows = None if segment_ids_NL is None else segment_ids_NL[lo: lo + len(bl)].repeat_interleave(K, dim=0)
        for r in range(0, rows, max(batch_size, 1)):
            sub = _row_slice(b, r, min(rows, r + max(batch_size, 1)))
            if seg_rows is not None:
                sub.attention_mask = with_document_mask(sub.attention_mask, seg_rows[r: r + sub.tokens_BS.shape[0]].numpy(),
                                                        sub.tokens_BS.shape[1], causal=objective.causal)
            out = loss_fn.forward(model, sub)
            losses.append(loss_fn.per_sequence(sub, out).double().cpu())
            ts.append(sub.t_B.double().cpu())
    return {"loss": torch.cat(losses).view(N, K), "t": torch.cat(ts).view(N, K)}


def _row_slice(b, lo: int, hi: int):
    from dataclasses import replace

    sl = lambda t: None if t is None else t[lo:hi]
    frac = (hi - lo) / b.tokens_BS.shape[0]
    return replace(b, tokens_BS=sl(b.tokens_BS), labels_BS=sl(b.labels_BS), loss_weight_BS=sl(b.loss_weight_BS), t_B=sl(b.t_B),
                   position_ids_BS=sl(b.position_ids_BS), num_clean_tokens=int(round(b.num_tokens * frac)),
                   **_kwargs_of([b], lambda vs: vs[0][lo:hi]))


def summarize_bound(loss_NK: torch.Tensor, t_NK: torch.Tensor, num_buckets: int = NUM_BUCKETS) -> dict:
    """Estimate, Monte Carlo standard error and the per-bucket table.

    The estimate is the mean over windows of each window's K-sample mean. The standard error
    is the Monte Carlo one for this data set: sqrt(sum_i s_i^2 / K) / N with s_i the sample
    std of window i's K values (conservative under stratification, which only lowers the
    variance)."""
    N, K = loss_NK.shape
    est = loss_NK.mean().item()
    se = (loss_NK.var(dim=1, unbiased=True).sum() / K).sqrt().item() / N if K > 1 else float("nan")
    k = torch.clamp((t_NK * num_buckets).long(), 0, num_buckets - 1).flatten()
    flat = loss_NK.flatten()
    buckets = []
    for j in range(num_buckets):
        sel = k == j
        n = int(sel.sum())
        buckets.append((j / num_buckets, (j + 1) / num_buckets, n, flat[sel].mean().item() if n else float("nan")))
    return {"nll": est, "se": se, "buckets": buckets}


@torch.no_grad()
def ar_nll(model, x_NL: torch.Tensor, *, batch_size: int, device="cpu", segment_ids_NL: torch.Tensor | None = None) -> tuple[float, int]:
    """Exact next-token NLL (sum, count) over the windows (L - 1 predictions per window);
    ``segment_ids_NL``: causal attention within each document only (data.document_masks)."""
    import torch.nn.functional as F

    from .data.loader import with_document_mask

    total, count = 0.0, 0
    for lo in range(0, x_NL.shape[0], batch_size):
        x = x_NL[lo: lo + batch_size].to(device)
        mask = None
        if segment_ids_NL is not None:
            mask = with_document_mask(None, segment_ids_NL[lo: lo + batch_size].numpy(), x.shape[1], causal=True).to(device)
        logits = model(x, None, mask).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return total, count


# --------------------------------------------------------------------------------------------
# Conditional likelihood of candidate answers


def answer_log_probs(model, xs_KN: torch.Tensor, x_N: torch.Tensor, P: int, A: int, *, vocab_size: int, shift: bool = False,
                     device="cpu", batch_size: int | None = None) -> torch.Tensor:
    """log p_theta(a_i | prompt, noised answer) of every answer token, per noised row.  -> [K, A] float64

    ``xs_KN``: K noised copies of prompt + answer (N = P + A); ``x_N`` the clean sequence.
    Token P + i is read at output P + i (plain masked models) or at output P + i - 1 for
    ``shift`` (diffusion.shift_logits: output i-1 predicts token i, as the model was trained).
    The one place where the model's logits for scoring are formed: a guided score
    (--cfg-scale, uncond + (1 + w)(cond - uncond)) would combine its two passes here.
    ``batch_size``: rows per forward pass (default: all K at once)."""
    K = xs_KN.shape[0]
    step = batch_size or K
    out = []
    for lo in range(0, K, step):
        logits = model(xs_KN[lo: lo + step].to(device), None, None).float()
        rows = logits[:, P - 1: P + A - 1] if shift else logits[:, P: P + A]
        logp = torch.log_softmax(rows[..., :vocab_size], -1)
        tgt = x_N[P: P + A].to(device)[None, :, None].expand(logp.shape[0], A, 1)
        out.append(logp.gather(-1, tgt)[..., 0].cpu().double())
    return torch.cat(out)


def llada_terms(model, x_N: torch.Tensor, P: int, is_masked_KA: torch.Tensor, weight_K: torch.Tensor, *, mask_id: int,
                vocab_size: int, shift: bool = False, device="cpu", batch_size: int | None = None) -> torch.Tensor:
    """Per-sample values of LLaDA's estimator, weight_k * sum_{i in S_k} log p(a_i | prompt, a_{-S_k}), for
    the answer x_N[P:] with the masks ``is_masked_KA`` (S_k = row k) and weights L / |S_k|.  -> [K] float64"""
    K, A = is_masked_KA.shape
    xs = x_N[None].expand(K, -1).clone()
    xs[:, P:] = torch.where(is_masked_KA, torch.full_like(xs[:, P:], mask_id), xs[:, P:])
    ll = answer_log_probs(model, xs, x_N, P, A, vocab_size=vocab_size, shift=shift, device=device, batch_size=batch_size)
    return weight_K * torch.where(is_masked_KA, ll, torch.zeros_like(ll)).sum(1)


@torch.no_grad()
def score_candidates(model, tok, prompt: str, candidates: list[str], num_samples: int = 128, seed: int = 0, *,
                     objective: str = "masked", eps: float = 1e-3, p_uniform: float = 0.1, shift: bool = False,
                     device="cpu", batch_size: int | None = None, return_terms: bool = False) -> list:
    """Log-likelihood scores (higher = more likely) of each candidate answer given the prompt.

    masked: LLaDA's lower-variance estimator (Nie et al. 2025, Eq. 6, diffusion/masked.py):
    per sample l ~ U{1..L} (L answer tokens), exactly l answer tokens masked (a uniformly random
    l-subset), the prompt clean, value (L/l) sum_{masked} log p(a_i | prompt, a_t); the score is
    the mean over ``num_samples`` samples, whose l are stratified ((o + k/K) mod 1 mapped to
    {1..L}: each l_k is still uniform). ``shift`` (diffusion.shift_logits): token i is scored
    from output i-1. uniform/hybrid: their ELBO integrand (diffusion/uniform.py) on answer
    tokens at K stratified t. ar: the exact log p(answer | prompt). The noise is a function of
    (seed, sample index) only, shared by all candidates (common random numbers: differences
    between candidates are much less noisy than the scores). Deterministic under ``seed``.
    ``batch_size``: rows per forward pass (masked). ``return_terms``: per candidate the [K]
    per-sample values instead of their mean.
    """
    from .diffusion import masked as md
    from .diffusion.noise import TAG_EVAL, generator

    p_ids = tok.encode(prompt)
    if objective not in ("masked", "uniform", "hybrid", "ar"):
        raise ValueError(f"score_candidates supports masked, uniform, hybrid and ar checkpoints, not {objective!r}")
    if shift and not p_ids:
        raise EvalDataError("a diffusion.shift_logits model scores answer token i from output i-1: give every item a non-empty prompt")
    K = num_samples
    g = generator(seed, TAG_EVAL + 200, 0)
    u_K = md.stratified_uniform(torch.rand((), generator=g, dtype=torch.float64).item(), K)
    enc = [tok.encode(c) for c in candidates]
    A_max = max([len(a) for a in enc] + [1])
    # Per-sample token uniforms (three vectors) from (seed, k): common across candidates.
    U = torch.stack([torch.rand(3, A_max, generator=generator(seed, TAG_EVAL + 200, k + 1), dtype=torch.float64)
                     for k in range(K)]) if objective != "ar" else None
    scores = []
    for a_ids in enc:
        if not a_ids:
            scores.append(torch.full((K,), float("-inf"), dtype=torch.float64) if return_terms else float("-inf"))
            continue
        x = torch.tensor(p_ids + a_ids, dtype=torch.long)
        P, A = len(p_ids), len(a_ids)
        if objective == "ar":
            v = _ar_answer_log_prob(model, x, P, A, tok.vocab_size, device)
            scores.append(torch.full((1,), v, dtype=torch.float64) if return_terms else v)
            continue
        if objective == "masked":
            l_K = md.num_masked_from_uniform(u_K, A)
            terms = llada_terms(model, x, P, md.mask_exactly(U[:, 0, :A], l_K), md.exact_count_weights(l_K, A),
                                mask_id=tok.mask_id, vocab_size=tok.vocab_size, shift=shift, device=device, batch_size=batch_size)
        else:
            terms = _interpolating_terms(model, tok, x, P, A, md.t_from_uniform(u_K, eps), U[:, :, :A],
                                         p_uniform=1.0 if objective == "uniform" else p_uniform, device=device)
        scores.append(terms if return_terms else terms.mean().item())
    return scores


def _ar_answer_log_prob(model, x: torch.Tensor, P: int, A: int, vocab_size: int, device) -> float:
    """Exact log p(answer | prompt) of a causal model (without a prompt, the first token is given)."""
    logits = model(x[None].to(device), None, None).float()[0]
    logp = torch.log_softmax(logits[:, :vocab_size], -1)
    tgt = x[P:].to(device)
    return (logp[P - 1: P + A - 1].gather(-1, tgt[:, None]).sum().item() if P > 0 else
            logp[: A - 1].gather(-1, tgt[1:, None]).sum().item())


def _interpolating_terms(model, tok, x: torch.Tensor, P: int, A: int, t_K: torch.Tensor, U_K3A: torch.Tensor, *,
                         p_uniform: float, device) -> torch.Tensor:
    """Uniform / hybrid noise: minus the ELBO integrand summed over the answer, per sample t_k.  -> [K] float64"""
    from .diffusion import uniform as ud

    K = t_K.shape[0]
    xs = x[None].expand(K, -1).clone()
    region = torch.zeros(K, P + A, dtype=torch.bool)
    region[:, P:] = True
    xs[:, P:] = ud.noise_tokens(xs[:, P:], t_K, U_K3A[:, 0], U_K3A[:, 1], U_K3A[:, 2], num_clean=tok.vocab_size - 1,
                                mask_id=tok.mask_id, p_uniform=p_uniform)
    logits = model(xs.to(device), None, None).float()
    f = ud.interpolating_loss_contributions(logits, x[None].expand(K, -1).to(device), xs.to(device), t_K.float().to(device),
                                            region.float().to(device), mask_id=tok.mask_id,
                                            num_clean=tok.vocab_size - 1, p_uniform=p_uniform)
    return -f.sum(1).cpu().double()


def read_choices(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise EvalDataError(f"choices file '{path}' does not exist")
    items = []
    for n, obj in jsonl_records(p.read_text(encoding="utf-8"), path, EvalDataError):
        if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("choices"), list)
                and obj["choices"] and isinstance(obj.get("answer"), int) and 0 <= obj["answer"] < len(obj["choices"])):
            raise EvalDataError(f"{path}:{n} needs {{\"prompt\": str, \"choices\": [str, ...], \"answer\": index}}")
        items.append(obj)
    if not items:
        raise EvalDataError(f"choices file '{path}' is empty")
    return items


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dlm_megatron.eval", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint) or one checkpoint folder")
    ap.add_argument("--data", default=None, help="evaluation text: a plain-text file (one document) or JSONL (one document per line)")
    ap.add_argument("--field", default="text", help="JSONL field holding the document text")
    ap.add_argument("--choices", default=None, help="multiple-choice JSONL ({\"prompt\", \"choices\", \"answer\"}): print accuracy")
    ap.add_argument("--num-samples", type=int, default=None,
                    help=f"Monte Carlo samples K per window (--data; default {DATA_SAMPLES}) or per candidate answer "
                         f"(--choices; default {CHOICE_SAMPLES}, LLaDA's count)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    ap.add_argument("--seq-len", type=int, default=None, help="window length in tokens (default: the checkpoint's data.seq_len)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo noise (results are deterministic given it)")
    ap.add_argument("--buckets", type=int, default=NUM_BUCKETS, help="number of noise-level buckets in the per-t loss table (0 = no table)")
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens of --data")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to run on")
    return ap


def run(args) -> list[str]:
    """Evaluate; returns the output lines (the last one is the headline number)."""
    from .diffusion.objectives import build_objective
    from .generate import load_model

    if args.data is None and args.choices is None:
        raise EvalDataError("pass --data FILE (likelihood) and/or --choices FILE.jsonl (multiple choice)")
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EvalDataError(f"--{name.replace('_', '-')} must be >= 1")
    docs = read_documents(args.data, args.field) if args.data else None
    items = read_choices(args.choices) if args.choices else None
    if docs is not None and not docs:
        raise EvalDataError(f"data file '{args.data}' holds no text")
    model, tok, cfg, meta = load_model(args.ckpt, args.device)
    obj = cfg.diffusion.objective
    lines: list[str] = []
    if docs is not None:
        seq_len = args.seq_len or cfg.data.seq_len
        mult = cfg.diffusion.block_size if obj == "block" else 1
        if seq_len % mult:
            raise EvalDataError(f"--seq-len {seq_len} must be a multiple of the block size {mult}")
        x, seg = token_windows(docs, tok, seq_len, args.max_tokens, mult, with_segments=True)
        # A model trained with document masks is evaluated with them (no attention across
        # the documents packed into a window), as in its training and validation.
        seg = seg if cfg.data.document_masks else None
        N, L = x.shape
        lines.append(f"data: {args.data} | {N} windows x {L} tokens | checkpoint {meta.get('step', '?')} | objective {obj}"
                     + (" | document masks" if seg is not None else ""))
        if obj == "ar":
            total, count = ar_nll(model, x, batch_size=args.batch_size, device=args.device, segment_ids_NL=seg)
            nll = total / count
            lines.append(f"nll (nats/token, exact, {count} predicted tokens): {nll:.4f}")
            lines.append(f"perplexity {math.exp(min(nll, 50.0)):.4f}")
        else:
            dcfg = copy.deepcopy(cfg.diffusion)
            dcfg.antithetic = True
            objective = build_objective(dcfg, tok.mask_id, args.seed, vocab_size=tok.vocab_size)
            K = args.num_samples or DATA_SAMPLES
            r = diffusion_bound(model, objective, x, num_samples=K, batch_size=args.batch_size, device=args.device,
                                segment_ids_NL=seg)
            s = summarize_bound(r["loss"], r["t"], args.buckets if args.buckets > 0 else 1)
            if args.buckets > 0 and bool(((r["t"] >= 0) & (r["t"] <= 1)).all()):  # (continuous: t_B is sigma, no table)
                lines.append(f"{'t bucket':<12}{'samples':>9}{'loss/token':>12}")
                for lo, hi, n, v in s["buckets"]:
                    lines.append(f"[{lo:.2f},{hi:.2f}) {n:>9}{v:>12.4f}")
            if obj == "continuous":
                lines.append("note: the continuous (CDCD) objective's loss is its denoising cross-entropy averaged over sigma, "
                             "not an ELBO: the number below is not a likelihood bound")
            lines.append(f"nll bound (nats/token): {s['nll']:.4f} +- {s['se']:.4f} (Monte Carlo standard error; "
                         f"K={K} stratified samples per window, seed {args.seed})")
            lines.append(f"perplexity_bound {math.exp(min(s['nll'], 50.0)):.4f}")
    if items is not None:
        correct = 0
        for it in items:
            sc = score_candidates(model, tok, it["prompt"], [str(c) for c in it["choices"]], args.num_samples or CHOICE_SAMPLES,
                                  args.seed, objective=obj, eps=cfg.diffusion.eps, p_uniform=cfg.diffusion.p_uniform,
                                  shift=bool(getattr(cfg.diffusion, "shift_logits", False)), device=args.device,
                                  batch_size=args.batch_size)
            correct += int(max(range(len(sc)), key=lambda j: sc[j]) == it["answer"])
        lines.append(f"accuracy {correct / len(items):.4f} ({correct}/{len(items)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError

    try:
        lines = run(args)
    except (EvalDataError, ConfigError, CheckpointError, DataError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        if "megatron.core" in sys.modules:
            try:
                from .parallel import dist as pdist

                pdist.destroy()
            except Exception:
                pass
    for ln in lines:
        print(ln, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
