"""Per-rank training-state bytes of the real megatron engine at EP2 x DP2, next to the planner.

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/check_moe_states.py OUT.json [key=value ...]

Trains configs/tiny_moe.yaml (shrunk by the common overrides) for one step in bf16 and records,
on every rank, the bytes of: the model's weights (bf16), megatron DDP's fp32 gradient buffers
(dense and expert-parallel), and the distributed optimizer's fp32 master shards and Adam
moments; rank 0 writes them with the planner's figures for the same config.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO  # noqa: E402


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def main():
    import torch.distributed as dist

    from dlm_megatron import train
    from dlm_megatron.config import load_config
    from dlm_megatron.planner import plan

    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(os.path.join(REPO, "configs/tiny_moe.yaml"), list(COMMON_OVERRIDES) + [
        "train.steps=1", "train.save_at_end=false", "train.precision=bf16", f"train.output_dir={out}.run"] + overrides)
    trainer = train.Trainer(cfg)
    trainer.fit()
    eng = trainer.engine
    buffers = list(eng.ddp.buffers) + list(eng.ddp.expert_parallel_buffers)
    opts = [o.optimizer for o in getattr(eng.optimizer, "chained_optimizers", [eng.optimizer])]
    mine = {
        "weights": tensor_bytes(p for p in eng.module.parameters()),
        "gradients": tensor_bytes(b.grad_data for b in buffers),
        "optimizer": sum(tensor_bytes(p for g in o.param_groups for p in g["params"])
                         + tensor_bytes(v for st in o.state.values() for v in st.values() if hasattr(v, "numel") and v.dim() > 0)
                         for o in opts),
    }
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)  # test script: outside the package's comm module on purpose
    if dist.get_rank() == 0:
        p = plan(cfg, gpus=dist.get_world_size(), gpu_mem_gib=80.0, vocab_size=trainer.tok.vocab_size, on_gpu=False)
        with open(out, "w") as f:
            json.dump({"ranks": ranks, "planned": {k: p["memory"][k] for k in ("weights", "gradients", "optimizer")}}, f)


if __name__ == "__main__":
    main()
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()
