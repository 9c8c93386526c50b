"""CPU step time of a mixture-of-experts model against the dense model with the same active
parameters: configs/tiny_moe.yaml (8 experts of 352 units, top-2) vs configs/tiny.yaml (dense
SwiGLU of 704 units), same width, depth, batch and data.

    python benchmarks/bench_moe.py                 # 10 timed steps each, interleaved
    python benchmarks/bench_moe.py --steps 20 --threads 2

One process builds both models (megatron-core's local spec, fp32, one rank) and times full
training steps (forward, backward, AdamW) on the same masked-diffusion micro-batches,
alternating dense and MoE so machine noise hits both alike; prints the median of each and
their ratio. The MoE model's extra cost is the router, the token permutation and 8 small
expert GEMMs in place of 2 large ones (SequentialMLP); the aux loss is on (coeff 0.01).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(path: str, overrides: list[str]):
    import torch

    from dlm_megatron.config import load_config
    from dlm_megatron.engine.deepspeed_engine import param_groups
    from dlm_megatron.model.denoiser import build_model, init_weights

    cfg = load_config(REPO / path, ["logging.wandb=disabled", *overrides])
    model = build_model(cfg, 8192, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    return cfg, model, opt


def step(model, opt, batch) -> float:
    from dlm_megatron.diffusion.masked import weighted_token_loss

    t0 = time.perf_counter()
    opt.zero_grad()
    nll = model(batch.tokens_BS, None, None, labels=batch.labels_BS)
    weighted_token_loss(nll, batch.loss_weight_BS, batch.num_tokens).backward()
    opt.step()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    a = ap.parse_args(argv)
    import torch

    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.model.moe import set_aux_loss_scale
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    torch.set_num_threads(a.threads)
    over = [f"data.seq_len={a.seq_len}"]
    from dlm_megatron.config import load_config

    pdist.init_distributed(load_config(REPO / "configs/tiny.yaml", ["logging.wandb=disabled"]))
    dense = build("configs/tiny.yaml", over)
    moe = build("configs/tiny_moe.yaml", over)
    set_aux_loss_scale(1.0, "cpu")
    obj = build_objective(dense[0].diffusion, 8191, 0, vocab_size=8192)
    x = torch.randint(0, 8000, (a.micro_batch_size, a.seq_len), generator=torch.Generator().manual_seed(0))
    batches = [obj.make_batch(x, torch.arange(a.micro_batch_size), step=s, global_batch_size=a.micro_batch_size)
               for s in range(a.steps + 2)]
    times = {"dense": [], "moe": []}
    for i, b in enumerate(batches):
        for name, (_, model, opt) in (("dense", dense), ("moe", moe)):
            dt = step(model, opt, b)
            if i >= 2:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, (_, m, _) in (("dense", dense), ("moe", moe))}
    tokens = a.micro_batch_size * a.seq_len
    print(f"| model | parameters | median step (s) | tokens/s |")
    print(f"|---|---|---|---|")
    for k in ("dense", "moe"):
        print(f"| {k} | {params[k] / 1e6:.2f}M | {med[k]:.3f} | {tokens / med[k]:,.0f} |")
    print(f"MoE / dense step time: {med['moe'] / med['dense']:.2f}x ({a.steps} steps each, interleaved, {a.threads} thread(s))")
    pdist.destroy()


if __name__ == "__main__":
    main()
