"""TP=2 vs TP=1: loss and every gradient of the masked-diffusion objective on one batch.

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/check_tp.py OUT.json [objective [key=value ...]]
Rank 0 writes {"loss_tp1", "loss_tp2", "max_grad_diff", "max_grad"} for pytest to assert.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO  # noqa: E402


def loss_and_grads(cfg, tok, x, pos, lay, segment_ids=None):
    """``segment_ids`` [B, S] (numpy): attend within documents only, each sample its own
    [B, 1, S, S] mask, as the trainer does with data.document_masks."""
    import torch

    from dlm_megatron.diffusion.masked import weighted_token_loss
    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.model import sharding
    from dlm_megatron.model.denoiser import build_model, canonical_params, init_weights

    model = build_model(cfg, tok.vocab_size, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=lay.tp_rank, pp_rank=0)
    with torch.no_grad():  # biases start at zero, which would hide a wrong TP split: make them nonzero
        for name, p in canonical_params(model, cfg, 0):
            if name.endswith(".bias"):
                full = torch.randn(sharding.full_shape(p.shape, name, cfg.parallel.tp),
                                   generator=torch.Generator().manual_seed(len(name))) * 0.5
                p.copy_(sharding.shard(full, name, lay.tp_rank, cfg.parallel.tp))
    from megatron.core import parallel_state as ps

    obj = build_objective(cfg.diffusion, tok.mask_id, cfg.train.seed, vocab_size=tok.vocab_size,
                          tp_group=ps.get_tensor_model_parallel_group() if lay.tp > 1 else None, tp_rank=lay.tp_rank, tp_size=lay.tp)
    b = obj.make_batch(x, pos, step=0, global_batch_size=len(x))
    if segment_ids is not None:
        from dlm_megatron.data.loader import with_document_mask

        b.attention_mask = with_document_mask(b.attention_mask, segment_ids, b.tokens_BS.shape[1], causal=obj.causal)
    nll = model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=None if b.logits_loss is not None else b.labels_BS, explicit_positions=b.position_ids_BS is not None,
                **(getattr(b, "model_kwargs", None) or {}))
    if b.logits_loss is not None:  # model returned logits (labels=None below)
        loss = b.logits_loss(nll, b).sum() / b.num_tokens
    else:
        loss = weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens)
    loss.backward()
    # Gather full gradients (canonical layout) from all TP ranks.
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    grads = {}
    for name, p in canonical_params(model, cfg, 0):
        g = p.grad.detach().contiguous()
        if cfg.parallel.tp > 1 and sharding.partition_dim(name) is not None:
            parts = [torch.empty_like(g) for _ in range(cfg.parallel.tp)]
            dist.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
            g = sharding.unshard(parts, name)
        grads[name] = g
    return loss.item(), grads


def main():
    out = sys.argv[1]
    objective = sys.argv[2] if len(sys.argv) > 2 else "masked"
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import torch

    from dlm_megatron.config import load_config
    from dlm_megatron.data.tokenizer import load_tokenizer
    from dlm_megatron.parallel import dist as pdist

    base = list(COMMON_OVERRIDES) + [f"diffusion.objective={objective}"] + sys.argv[3:]  # optional extra key=value
    tok = load_tokenizer("builtin")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, tok.vocab_size, (4, 32), generator=g)
    pos = torch.arange(4)
    res = {}
    for tp in (2, 1):
        cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), base + [f"parallel.tp={tp}"])
        lay = pdist.init_distributed(cfg)
        res[tp] = loss_and_grads(cfg, tok, x, pos, lay)
    (l2, g2), (l1, g1) = res[2], res[1]
    diff = max((g2[k] - g1[k]).abs().max().item() for k in g1)
    worst = max(g1, key=lambda k: (g2[k] - g1[k]).abs().max().item())
    if lay.rank == 0:
        with open(out, "w") as f:
            json.dump({"loss_tp1": l1, "loss_tp2": l2, "max_grad_diff": diff, "worst": worst, "params": sorted(g1),
                       "max_grad": max(v.abs().max().item() for v in g1.values())}, f)
    pdist.destroy()


if __name__ == "__main__":
    main()
