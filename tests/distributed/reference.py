"""Plain single-process PyTorch reference trainer: no DeepSpeed, no parallelism.

Same model, data order, noise and LR schedule as dlm_megatron.train, optimised with a bare
torch.optim.AdamW loop (manual gradient accumulation and clipping). The layout tests
compare every DeepSpeed / TP / PP run against it.

usage: python tests/distributed/reference.py OUT_DIR [key=value ...]
Writes OUT_DIR/losses.json, OUT_DIR/grad_norms.json (pre-clip, float64) and OUT_DIR/params.safetensors
(canonical names, full tensors).

With data.sft_path (prompt/response JSONL) it is an independent SFT reference: its own
encoding and padding (each global batch padded with EOT to its longest prompt + response +
EOT, rounded up to a multiple of 8) and LLaDA's SFT loss written out (masked response tokens'
NLL / t, divided by the response length up to the padded length, mean over samples), with
the noise of MaskedDiffusion (t, then token uniforms per global sample position). It also
writes OUT_DIR/lengths.json, the padded length of each step.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO, global_norm_f64  # noqa: E402


def torch_no_grad_lazy(fn):
    def wrapper(*a, **k):
        import torch

        with torch.no_grad():
            return fn(*a, **k)
    return wrapper


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    # "@length_multiple=N": random lengths rounded up to a multiple of N, as the trainer does
    # under sequence parallelism at tp=N (a single process cannot run sequence parallelism)
    multiple = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("@length_multiple=")]
    overrides = [o for o in overrides if not o.startswith("@length_multiple=")]
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from dlm_megatron.config import load_config
    from dlm_megatron.data.corpus import resolve_data_path
    from dlm_megatron.data.loader import PackedDataset, sample_indices
    from dlm_megatron.data.tokenizer import load_tokenizer
    from dlm_megatron.diffusion.masked import weighted_token_loss
    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.engine.deepspeed_engine import param_groups
    from dlm_megatron.engine.schedules import lr_at
    from dlm_megatron.model.denoiser import build_model, canonical_params, init_weights
    from dlm_megatron.parallel import dist as pdist

    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), list(COMMON_OVERRIDES) + overrides)
    pdist.init_distributed(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    sft = sft_examples(cfg, tok) if cfg.data.sft_path else None
    ds = sft or PackedDataset(resolve_data_path(cfg.data.train_path, cfg.data.cache_dir, tok), cfg.data.seq_len, tok.eot_id)
    model = build_model(cfg, tok.vocab_size, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    obj = build_objective(cfg.diffusion, tok.mask_id, t.seed, vocab_size=tok.vocab_size, length_multiple=(multiple or [1])[0])
    G, mbs = t.global_batch_size, t.micro_batch_size
    gas = G // mbs
    if cfg.model.num_moe_experts:
        from dlm_megatron.model.moe import set_aux_loss_scale

        set_aux_loss_scale(1.0 / gas, "cpu")  # the routers' aux loss, like the loss: mean over micro-batches
    losses, lengths, grad_norms = [], [], []
    for step in range(t.steps):
        idx = sample_indices(step, G, len(ds), t.seed)
        if sft is not None:
            x, P = sft_batch(sft, idx, tok.eot_id, cfg.data.seq_len)
            lengths.append(x.shape[1])
        else:
            x = torch.from_numpy(np.stack([ds[int(i)] for i in idx]))
        pos = torch.arange(step * G, (step + 1) * G)
        lr = lr_at(step, schedule=t.lr_schedule, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                   total_steps=t.steps, decay_fraction=t.decay_fraction)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        step_losses = []
        for i in range(0, G, mbs):
            if sft is not None:
                loss = sft_loss(model, obj, x[i:i + mbs], P[i:i + mbs], pos[i:i + mbs], step, G, tok.mask_id)
                (loss / gas).backward()
                step_losses.append(loss.item())
                continue
            b = obj.make_batch(x[i:i + mbs], pos[i:i + mbs], step=step, global_batch_size=G)
            nll = model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=None if b.logits_loss else b.labels_BS,
                        explicit_positions=b.position_ids_BS is not None)
            if b.logits_loss:
                loss = b.logits_loss(nll, b).sum() / b.num_tokens
            else:
                loss = weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens)
            (loss / gas).backward()
            step_losses.append(loss.item())
        # the pre-clip global norm: the layouts' logged grad_norm must equal it, which pins
        # the gradient's scale that clipping hides
        grad_norms.append(global_norm_f64(model))
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        update_expert_bias(model, cfg)
        losses.append(sum(step_losses) / len(step_losses))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump(losses, f)
    with open(os.path.join(out, "lengths.json"), "w") as f:
        json.dump(lengths, f)
    with open(os.path.join(out, "grad_norms.json"), "w") as f:
        json.dump(grad_norms, f)
    save_file({n: p.detach().contiguous() for n, p in canonical_params(model, cfg, 0)}, os.path.join(out, "params.safetensors"))
    pdist.destroy()


def sft_examples(cfg, tok) -> list:
    """(prompt ids, response ids + EOT) of each JSONL line; the test data fit in data.seq_len."""
    rows = []
    with open(cfg.data.sft_path) as f:
        for line in f:
            if line.strip():
                ex = json.loads(line)
                p, r = tok.encode(ex["prompt"]), tok.encode(ex["response"]) + [tok.eot_id]
                assert len(p) + len(r) <= cfg.data.seq_len, "reference.py does not cut long SFT examples"
                rows.append((p, r))
    return rows


def sft_batch(examples, idx, eot: int, seq_len: int):
    """Tokens [G, Lb] padded with EOT to the batch's longest example rounded up to 8, and P [G]."""
    import torch

    longest = max(len(examples[i][0]) + len(examples[i][1]) for i in idx)
    Lb = min(seq_len, (longest + 7) // 8 * 8)
    x = torch.full((len(idx), Lb), eot, dtype=torch.long)
    for row, i in enumerate(idx):
        ids = examples[i][0] + examples[i][1]
        x[row, :len(ids)] = torch.tensor(ids)
    return x, torch.tensor([len(examples[i][0]) for i in idx])


def sft_loss(model, obj, x, P, pos, step: int, G: int, mask_id: int):
    """mean_b sum_{masked response tokens} nll / t_b / (Lb - P_b) with MaskedDiffusion's noise."""
    import torch

    from dlm_megatron.diffusion.noise import TAG_SAMPLE

    B, Lb = x.shape
    t = obj.sample_t(pos, step=step, global_batch_size=G, stream=TAG_SAMPLE)
    u = obj.token_uniforms(pos, Lb, TAG_SAMPLE)
    masked = (u < t[:, None]) & (torch.arange(Lb)[None, :] >= P[:, None])
    nll = model(torch.where(masked, torch.full_like(x, mask_id), x), None, None, labels=x)
    per = [(nll[b][masked[b]].double() / t[b]).sum() / (Lb - P[b]) for b in range(B)]
    return torch.stack(per).mean().float()


@torch_no_grad_lazy
def update_expert_bias(model, cfg):
    """Aux-loss-free balancing written out (DeepSeek-V3): after the step, each router's bias
    moves by rate * sign(mean load - load), loads counted over the whole global batch."""
    for r in (m for m in model.modules() if getattr(m, "expert_bias", None) is not None):
        load = r.local_tokens_per_expert
        r.expert_bias += (load.mean() - load).sign() * cfg.model.moe_router_bias_update_rate
        load.zero_()


if __name__ == "__main__":
    main()
