"""An independent reference trainer for the masked objective: plain PyTorch for the parts a
shared bug could hide in.

tests/distributed/reference.py checks the parallel layouts against single-process AdamW, but
it takes its objective and LR schedule from the library: a bug in either would be in both
and cancel out. Here those two are written out again from their definitions, without
importing them:

- masked objective (LLaDA, Nie et al. 2025, Alg. 1): per sequence t = eps + (1 - eps) u;
  token i is masked iff its uniform < t; loss = sum over masked tokens of CE(logits, x0) / t,
  divided by the number of tokens B*L; one forward over the whole global batch, CE from the
  model's logits with torch's cross_entropy (not the library's vocab-parallel loss).
- schedule: linear warmup to lr over warmup_steps, then cosine from lr to min_lr at steps.
- AdamW with decoupled weight decay on matrices only; gradient norm clipping.

Shared with the library on purpose: the model and its initialisation, the data order
(sample_indices) and the noise *stream* contract of diffusion/noise.py (a generator per
(seed, purpose, global sample position), t drawn first, then the L token uniforms), which
is reimplemented below from that contract so the draws match bit for bit.

usage: python tests/distributed/reference_plain.py OUT_DIR [key=value ...]
Writes OUT_DIR/losses.json and OUT_DIR/params.safetensors (canonical names).
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO, global_norm_f64  # noqa: E402


def lr_at(step: int, t) -> float:
    """Warmup then cosine, from the definition (0-based step)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def noise(seed: int, position: int, L: int, eps: float):
    """t and the L token uniforms of the sample at global ``position`` (purpose tag 1)."""
    import numpy as np
    import torch

    s0, s1 = np.random.SeedSequence([seed & 0xFFFFFFFF, 1, position]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(s0) << 32 | int(s1))
    u_t = torch.rand((), generator=g, dtype=torch.float64)
    return eps + (1.0 - eps) * u_t, torch.rand(L, generator=g, dtype=torch.float64)


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from dlm_megatron.config import load_config
    from dlm_megatron.data.corpus import resolve_data_path
    from dlm_megatron.data.loader import PackedDataset, sample_indices
    from dlm_megatron.data.tokenizer import load_tokenizer
    from dlm_megatron.model.denoiser import build_model, canonical_params, init_weights
    from dlm_megatron.parallel import dist as pdist

    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), list(COMMON_OVERRIDES) + overrides)
    d, t = cfg.diffusion, cfg.train
    assert d.objective == "masked" and not d.antithetic and d.random_length_prob == 0, "plain masked objective only"
    pdist.init_distributed(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    ds = PackedDataset(resolve_data_path(cfg.data.train_path, cfg.data.cache_dir, tok), cfg.data.seq_len, tok.eot_id)
    model = build_model(cfg, tok.vocab_size, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    matrices = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": t.weight_decay}, {"params": others, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    G, L = t.global_batch_size, cfg.data.seq_len
    losses, grad_norms = [], []
    for step in range(t.steps):
        x0 = torch.from_numpy(np.stack([ds[int(i)] for i in sample_indices(step, G, len(ds), t.seed)]))
        draws = [noise(t.seed, step * G + j, L, d.eps) for j in range(G)]
        t_B = torch.stack([tt for tt, _ in draws])
        masked = torch.stack([u for _, u in draws]) < t_B[:, None]
        xt = torch.where(masked, torch.full_like(x0, tok.mask_id), x0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.zero_grad()
        logits = model(xt, None, None).float()
        ce = F.cross_entropy(logits.reshape(G * L, -1), x0.reshape(-1), reduction="none").view(G, L)
        loss = (ce * masked / t_B[:, None].float()).sum() / (G * L)
        loss.backward()
        grad_norms.append(global_norm_f64(model))
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        losses.append(loss.item())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump(losses, f)
    with open(os.path.join(out, "grad_norms.json"), "w") as f:
        json.dump(grad_norms, f)
    save_file({n: p.detach().contiguous() for n, p in canonical_params(model, cfg, 0)}, os.path.join(out, "params.safetensors"))
    pdist.destroy()


if __name__ == "__main__":
    main()
