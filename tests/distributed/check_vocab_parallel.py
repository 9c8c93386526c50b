"""The uniform/hybrid ELBO integrand from vocab-parallel logits equals the full-vocabulary one.

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/check_vocab_parallel.py OUT.json
A toy vocabulary where the split matters: MASK inside rank 0's columns and padded rows
(13 real ids in 16 columns, so rank 1 holds 3 padding columns). Float64, plain gloo, no model:
the integrand and its gradient wrt every logit are compared with the TP=1 path
(``clean_log_probs`` + ``interpolating_elbo_terms``). Rank 0 writes the max differences.
"""
import json
import sys

import torch
import torch.distributed as dist


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from dlm_megatron.diffusion import uniform as ud

    torch.manual_seed(0)
    B, L, Vp, mask_id, num_clean = 3, 6, 16, 1, 12
    logits = (torch.randn(B, L, Vp, dtype=torch.float64) * 3).requires_grad_()
    x0 = torch.randint(2, num_clean + 1, (B, L))
    zt = x0.clone()
    zt[0, :2] = mask_id
    zt[1, 3] = 5
    zt[2, 1] = 12
    t = torch.tensor([0.3, 0.8, 0.05], dtype=torch.float64)
    Vl = Vp // world
    res = {}
    for p_u in (1.0, 0.3):
        logp = torch.log_softmax(torch.cat([logits[..., :mask_id], logits[..., mask_id + 1:num_clean + 1]], -1), -1)
        f1 = ud.interpolating_elbo_terms(logp, x0, zt, t, mask_id=mask_id, p_uniform=p_u)
        w = torch.rand(B, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # any upstream gradient
        g1, = torch.autograd.grad((f1 * w).sum(), logits)
        local = logits.detach()[..., rank * Vl:(rank + 1) * Vl].clone().requires_grad_()
        f2 = ud.interpolating_elbo_terms_vocab_parallel(local, x0, zt, t, mask_id=mask_id, num_clean=num_clean,
                                                        p_uniform=p_u, vocab_start=rank * Vl, group=None)
        g2, = torch.autograd.grad((f2 * w).sum(), local)
        parts = [torch.empty_like(g2) for _ in range(world)]
        dist.all_gather(parts, g2.contiguous())
        g2_full = torch.cat(parts, -1)
        res[str(p_u)] = {"f": (f1 - f2).abs().max().item(), "grad": (g1 - g2_full).abs().max().item(),
                         "max_grad": g1.abs().max().item(), "pad_grad": g2_full[..., num_clean + 1:].abs().max().item()}
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(res, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
