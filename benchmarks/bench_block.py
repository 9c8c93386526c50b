"""Block-diffusion benchmarks (CPU): vectorised 2L training vs a per-block loop, and the
KV-cached sampler vs recomputing the full forward at every step.

    python benchmarks/bench_block.py                    # both, defaults below
    python benchmarks/bench_block.py --only train --seq-len 512 --block-size 16 --batch 4
    python benchmarks/bench_block.py --only sample --gen-length 256 --block-size 16

Both sides of each comparison use the same model (configs/tiny_block.yaml's shape, random
weights, fp32), the same batch / prompt and, for sampling, the same number of denoising
steps; repeats are interleaved (A, B, A, B, ...) so load changes hit both. Prints a
markdown table (medians) with the machine and date.

Shape legend: B batch, L clean length, K block size.
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

REPO = Path(__file__).resolve().parents[1]
NUM_PARAMS = [0]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: [seconds per repeat]}, one warm-up call each first."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn))
    return out


def build(args, seq_len: int):
    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist

    cfg = load_config(str(REPO / "configs/tiny_block.yaml"), [
        f"data.seq_len={seq_len}", f"diffusion.block_size={args.block_size}", "model.attention_backend=dense",
        "logging.wandb=disabled", f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
        *([f"model.num_layers={args.layers}"] if args.layers else []),
        *([f"model.hidden_size={args.hidden}", "model.ffn_hidden_size=null"] if args.hidden else [])])
    pdist.init_distributed(cfg)
    model = build_model(cfg, args.vocab, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    NUM_PARAMS[0] = sum(p.numel() for p in model.parameters())
    return model, cfg


def bench_train(args) -> list[tuple]:
    import torch

    from dlm_megatron.diffusion import block as bd
    from dlm_megatron.diffusion.masked import weighted_token_loss
    from dlm_megatron.diffusion.objectives import BlockDiffusion

    model, cfg = build(args, args.seq_len)
    mask_id = args.vocab - 1
    x0 = torch.randint(0, mask_id, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    b = BlockDiffusion(cfg.diffusion, mask_id, 0).make_batch(x0, torch.arange(args.batch), step=0, global_batch_size=args.batch)
    xt, w = b.tokens_BS[:, :args.seq_len], b.loss_weight_BS[:, :args.seq_len]

    def nll_fn(tokens, positions, mask, labels):
        return model(tokens, positions, mask, labels=labels, explicit_positions=True)

    losses = {}

    def vectorised():
        model.zero_grad(set_to_none=True)
        loss = weighted_token_loss(nll_fn(b.tokens_BS, b.position_ids_BS, b.attention_mask, b.labels_BS), b.loss_weight_BS, b.num_tokens)
        loss.backward()
        losses["2L"] = loss.item()

    def loop():
        model.zero_grad(set_to_none=True)
        loss = bd.per_block_loss(nll_fn, x0, xt, w, args.block_size)
        loss.backward()
        losses["loop"] = loss.item()

    t = interleaved({"vectorised 2L step": vectorised, "per-block loop step": loop}, args.repeats)
    tokens = args.batch * args.seq_len
    med = {k: statistics.median(v) for k, v in t.items()}
    note = f"loss {losses['2L']:.6f} vs {losses['loop']:.6f}"
    return [
        (f"train fwd+bwd, L={args.seq_len}, K={args.block_size}, batch {args.batch}", k, f"{m:.3f} s",
         f"{tokens / m:,.0f} tok/s", f"{med['per-block loop step'] / m:.2f}x", note)
        for k, m in med.items()
    ]


def bench_sample(args) -> list[tuple]:
    import torch

    from dlm_megatron.sampling import SamplerConfig, generate_blocks

    model, _ = build(args, args.seq_len)
    model.eval()
    mask_id = args.vocab - 1
    prompt = torch.randint(0, mask_id, (1, args.prompt_length), generator=torch.Generator().manual_seed(1))
    scfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block_size, steps=args.steps or args.gen_length, seed=0)
    outs = {}

    def run(cache):
        def fn():
            outs[cache] = generate_blocks(model, prompt, mask_id, scfg, vocab_size=args.vocab, use_cache=cache)

        return fn

    t = interleaved({"KV-cached": run(True), "recompute every step": run(False)}, args.repeats)
    med = {k: statistics.median(v) for k, v in t.items()}
    same = "same tokens" if torch.equal(outs[True], outs[False]) else "tokens differ"
    return [
        (f"sample {args.gen_length} tokens, prompt {args.prompt_length}, K={args.block_size}, {scfg.steps} steps", k,
         f"{m:.3f} s", f"{args.gen_length / m:,.1f} tok/s", f"{med['recompute every step'] / m:.2f}x", same)
        for k, m in med.items()
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--only", choices=("train", "sample"), default=None, help="run one benchmark (default: both)")
    ap.add_argument("--seq-len", type=int, default=512, help="clean training length L")
    ap.add_argument("--block-size", type=int, default=16, help="block size K (training and sampling)")
    ap.add_argument("--batch", type=int, default=4, help="training batch size")
    ap.add_argument("--layers", type=int, default=None, help="model.num_layers (default: tiny_block's 4)")
    ap.add_argument("--hidden", type=int, default=None, help="model.hidden_size (default: tiny_block's 256; FFN 8/3 of it)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the random model (last id is MASK)")
    ap.add_argument("--gen-length", type=int, default=256, help="tokens to generate")
    ap.add_argument("--prompt-length", type=int, default=16, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=None, help="total denoising steps (default: gen-length)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)

    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "train"):
        rows += bench_train(args)
    if args.only in (None, "sample"):
        rows += bench_sample(args)
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}; "
          f"{datetime.date.today().isoformat()}; model configs/tiny_block.yaml with {args.layers or 4} layers x {args.hidden or 256} "
          f"(vocab {args.vocab}, {NUM_PARAMS[0] / 1e6:.1f}M parameters), fp32, "
          f"medians of {args.repeats}")
    print("\n| benchmark | variant | median time | throughput | speed-up vs baseline | check |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
