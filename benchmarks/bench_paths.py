"""Cost of the attention kernels and precisions on this machine, side by side.

    python benchmarks/bench_paths.py [--seq-len 256] [--batch 8] [--repeats 5]

One forward+backward of the masked-diffusion loss on configs/tiny.yaml's model (same weights,
same batch) for each variant, repeats interleaved (A, B, C, ... A, B, C) so load changes hit
all of them; prints medians and the ratio to the first variant:
- dense fp32: megatron-core's unfused attention (the s x s scores materialised);
- sdpa fp32: torch scaled_dot_product_attention;
- sdpa bf16 params: what the megatron engine and DeepSpeed ZeRO >= 1 run with bf16;
- sdpa bf16 autocast: fp32 weights under torch.autocast (DeepSpeed ZeRO-0's bf16).
On CPU these say what the CPU suite pays; GPU figures are in docs/BENCHMARKS.md (gpu_check.sh).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_block import cpu_name  # noqa: E402

VARIANTS = {
    "dense fp32": ("dense", "fp32"),
    "sdpa fp32": ("sdpa", "fp32"),
    "sdpa bf16 params": ("sdpa", "bf16"),
    "sdpa bf16 autocast": ("sdpa", "autocast"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=256, help="sequence length")
    ap.add_argument("--batch", type=int, default=8, help="batch size")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args(argv)

    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import torch

    from dlm_megatron.config import load_config
    from dlm_megatron.diffusion.masked import weighted_token_loss
    from dlm_megatron.diffusion.objectives import build_objective
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import comm  # noqa: F401  (package import order)
    from dlm_megatron.parallel import dist as pdist

    if a.threads:
        torch.set_num_threads(a.threads)
    vocab = 8192
    steps = {}
    for name, (backend, prec) in VARIANTS.items():
        cfg = load_config("configs/tiny.yaml", [f"model.attention_backend={backend}", f"data.seq_len={a.seq_len}",
                                                "logging.wandb=disabled"])
        pdist.init_distributed(cfg)
        model = build_model(cfg, vocab, pre_process=True, post_process=True,
                            params_dtype=torch.bfloat16 if prec == "bf16" else torch.float32)
        init_weights(model, cfg, tp_rank=0, pp_rank=0)
        obj = build_objective(cfg.diffusion, vocab - 1, 0, vocab_size=vocab)
        x = torch.randint(0, vocab - 1, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))
        b = obj.make_batch(x, torch.arange(a.batch), step=0, global_batch_size=a.batch)

        def step(model=model, b=b, prec=prec):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "autocast"):
                nll = model(b.tokens_BS, b.position_ids_BS, b.attention_mask, labels=b.labels_BS)
            weighted_token_loss(nll, b.loss_weight_BS, b.num_tokens).backward()

        steps[name] = step
    times = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(a.repeats):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["dense fp32"]
    tokens = a.batch * a.seq_len
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; configs/tiny.yaml model, "
          f"batch {a.batch} x seq {a.seq_len}, masked diffusion fwd+bwd, medians of {a.repeats}")
    print("\n| variant | median step | tokens/s | time vs dense fp32 |\n|---|---|---|---|")
    for k, m in med.items():
        print(f"| {k} | {m * 1e3:.1f} ms | {tokens / m:,.0f} | {m / base:.2f}x |")
    pdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
