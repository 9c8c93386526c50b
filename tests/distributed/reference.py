"""Plain single-process PyTorch reference trainer: no DeepSpeed, no parallelism.

Same model, data order, noise and LR schedule as dlm_megatron.train, optimised with a bare
torch.optim.AdamW loop (manual gradient accumulation and clipping). The layout tests
compare every DeepSpeed / TP / PP run against it.

usage: python tests/distributed/reference.py OUT_DIR [key=value ...]
Writes OUT_DIR/losses.json and OUT_DIR/params.safetensors (canonical names, full tensors).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO  # noqa: E402


def torch_no_grad_lazy(fn):
    def wrapper(*a, **k):
        import torch

        with torch.no_grad():
            return fn(*a, **k)
    return wrapper


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
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
    ds = PackedDataset(resolve_data_path(cfg.data.train_path, cfg.data.cache_dir, tok), cfg.data.seq_len, tok.eot_id)
    model = build_model(cfg, tok.vocab_size, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    obj = build_objective(cfg.diffusion, tok.mask_id, t.seed, vocab_size=tok.vocab_size)
    G, mbs = t.global_batch_size, t.micro_batch_size
    gas = G // mbs
    if cfg.model.num_moe_experts:
        from dlm_megatron.model.moe import set_aux_loss_scale

        set_aux_loss_scale(1.0 / gas, "cpu")  # the routers' aux loss, like the loss: mean over micro-batches
    losses = []
    for step in range(t.steps):
        idx = sample_indices(step, G, len(ds), t.seed)
        x = torch.from_numpy(np.stack([ds[int(i)] for i in idx]))
        pos = torch.arange(step * G, (step + 1) * G)
        lr = lr_at(step, schedule=t.lr_schedule, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                   total_steps=t.steps, decay_fraction=t.decay_fraction)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        step_losses = []
        for i in range(0, G, mbs):
            b = obj.make_batch(x[i:i + mbs], pos[i:i + mbs], step=step, global_batch_size=G)
            nll = model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=None if b.logits_loss else b.labels_BS,
                        explicit_positions=b.position_ids_BS is not None)
            if b.logits_loss:
                loss = b.logits_loss(nll, b).sum() / b.num_tokens
            else:
                loss = weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens)
            (loss / gas).backward()
            step_losses.append(loss.item())
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        update_expert_bias(model, cfg)
        losses.append(sum(step_losses) / len(step_losses))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump(losses, f)
    save_file({n: p.detach().contiguous() for n, p in canonical_params(model, cfg, 0)}, os.path.join(out, "params.safetensors"))
    pdist.destroy()


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
