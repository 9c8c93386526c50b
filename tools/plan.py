#!/usr/bin/env python
"""Size a parallel layout: parameters, FLOPs per token, per-GPU memory, fit, tokens/day.

usage: python tools/plan.py CONFIG [section.key=value ...] --gpus N --gpu-mem-gib M
                            [--mfu 0.4] [--peak-tflops 989] [--overhead-gib 2]
                            [--fragmentation 0.1] [--vocab-size V] [--json]

The formulas live in dlm_megatron/planner.py and are explained in docs/planner.md.
A bad config or an impossible layout prints one line 'plan.py: error: ...' and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlm_megatron.config import ConfigError, load_config  # noqa: E402
from dlm_megatron.planner import PlanError, format_plan, plan  # noqa: E402

DESCRIPTION = """Plan a training layout for CONFIG on N GPUs of M GiB each.

Prints the parameter count (total and per GPU under TP/PP), training FLOPs per token, the
per-GPU memory breakdown (weights, gradients, AdamW states partitioned by ZeRO over
DP = N/(tp*pp), activations for the config's recompute mode, sequence length, micro batch,
TP/sequence parallel and 1F1B in-flight microbatches, logits/cross-entropy buffers), a
total with an overhead allowance, whether it fits, and tokens/day at the given MFU.
The layout comes from the config's parallel.* and train.* keys; change it with overrides,
e.g. parallel.tp=4 parallel.zero_stage=2 model.recompute=full train.micro_batch_size=2.
precision 'auto' is planned as bf16 (a GPU run)."""

EPILOG = """exit status: 0 planned (whether or not it fits), 2 bad config or impossible layout.
examples:
  python tools/plan.py configs/8b.yaml --gpus 64 --gpu-mem-gib 80
  python tools/plan.py configs/1b.yaml parallel.zero_stage=2 --gpus 8 --gpu-mem-gib 40 --json"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too; keep it short)
        sys.stderr.write(f"plan.py: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="plan.py", description=DESCRIPTION, epilog=EPILOG,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", metavar="CONFIG", help="YAML preset, e.g. configs/8b.yaml")
    ap.add_argument("overrides", metavar="section.key=value", nargs="*",
                    help="config overrides, as for dlm-train (e.g. parallel.tp=4 model.recompute=full)")
    ap.add_argument("--gpus", type=int, required=True, metavar="N",
                    help="total number of GPUs; must be a multiple of parallel.tp*parallel.pp (DP = N/(tp*pp))")
    ap.add_argument("--gpu-mem-gib", type=float, required=True, metavar="M",
                    help="memory of one GPU in GiB (e.g. 80 for H100 80GB); the plan says whether the total fits")
    ap.add_argument("--mfu", type=float, default=0.4,
                    help="model FLOPs utilisation assumed for tokens/day, in (0, 1] (default 0.4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense bf16 TFLOP/s of one GPU (default 989, H100/H200 SXM)")
    ap.add_argument("--overhead-gib", type=float, default=2.0,
                    help="fixed per-GPU allowance for CUDA context, NCCL and cuBLAS workspaces in GiB (default 2)")
    ap.add_argument("--fragmentation", type=float, default=0.10,
                    help="allocator fragmentation allowance as a fraction of the modeled peak (default 0.10)")
    ap.add_argument("--vocab-size", type=int, default=None, metavar="V",
                    help="vocabulary size if model.vocab_size is unset (default: model.vocab_size, "
                         "else the size of data.tokenizer)")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON object (bytes, FLOPs, tokens)")
    return ap


def resolve_vocab(cfg, override: int | None) -> int:
    if override is not None:
        return override
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    try:
        from dlm_megatron.data.tokenizer import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer).vocab_size
    except Exception as e:  # noqa: BLE001 - any failure means we cannot know V
        raise PlanError(f"model.vocab_size is unset and tokenizer '{cfg.data.tokenizer}' could not be loaded "
                        f"({type(e).__name__}); set model.vocab_size=... or --vocab-size") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib, vocab_size=resolve_vocab(cfg, args.vocab_size),
                      mfu=args.mfu, peak_tflops=args.peak_tflops, overhead_gib=args.overhead_gib,
                      fragmentation=args.fragmentation)
    except (ConfigError, PlanError) as e:
        sys.stderr.write(f"plan.py: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        return 2
    try:
        print(json.dumps(result, indent=1) if args.json else format_plan(result))
    except BrokenPipeError:  # e.g. piped into head
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
