"""Fast-dLLM for masked models (CPU): dual KV cache + parallel threshold vs LLaDA's uncached
sampler at the same number of steps N, and how far the cache's approximation moves the
logits and the tokens.

    python benchmarks/bench_fast_dllm.py --threads 1 --repeats 2                       # 34M, prompt 16
    python benchmarks/bench_fast_dllm.py --threads 1 --repeats 2 --prompt-length 256   # 34M, prompt 256

Model: configs/tiny.yaml's masked denoiser with 8 layers x 512 (34M parameters with vocabulary
8192, as in docs/BENCHMARKS.md's block-sampler figures), random weights, fp32, dense attention.
Random weights spread their probability over the whole vocabulary (max ~1e-3 at every masked
position), so the parallel threshold never fires and commits the single most confident
position per step: the same number of forwards as LLaDA's schedule at N = gen-length, so the
speed-up measured is the cache's alone, a lower bound for a trained model whose confident
positions are committed together. ``--output-scale`` multiplies the output layer, but it does
not make a random model realistic: all masked positions get the same confidence (0.40 at 8,
0.93 at 16), so tau either never or always fires. Variants, all with
gen-length 256, block 32, N = 256 (8 blocks x 32 steps), greedy low-confidence remasking:

- ``LLaDA uncached``: cache none, one full forward per step, the schedule's count per step;
- ``dual + threshold``: Fast-dLLM, cache dual and parallel_threshold TAU;
- ``none + threshold`` (``--with-uncached-threshold``): the same policy without the cache, the
  reference for the cache's token agreement.

``--ckpt PATH`` times a trained masked checkpoint instead (its weights, vocabulary and MASK id,
dense attention, the first P tokens of the builtin validation text as the prompt): there the
threshold can commit several confident positions per forward.

Repeats are interleaved (A, B, A, B, ...) after one untimed warm-up of the fast variant; both
the wall time and the process's CPU time are reported (on a shared machine the CPU time, with
one intra-op thread, is the steadier measure of the work).
Accuracy (untimed, one run): at every cached step of the dual sampler the block's logits are
compared with a full forward of the same sequence (mean |difference| and argmax agreement), and
the final tokens are compared with the uncached samplers'.

Shape legend: B batch (1), P prompt length, S = P + 256, V vocabulary.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_block import cpu_name  # noqa: E402


def build(args):
    import torch

    from dlm_megatron.config import load_config
    from dlm_megatron.model.denoiser import build_model, init_weights
    from dlm_megatron.parallel import dist as pdist

    cfg = load_config(str(REPO / "configs/tiny.yaml"), [
        f"data.seq_len={args.prompt_length + args.gen_length}", "model.attention_backend=dense", "logging.wandb=disabled",
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.ffn_hidden_size=null"])
    pdist.init_distributed(cfg)
    model = build_model(cfg, args.vocab, pre_process=True, post_process=True)
    init_weights(model, cfg, tp_rank=0, pp_rank=0)
    with torch.no_grad():
        model.output_layer.weight.mul_(args.output_scale)
    return model.eval(), sum(p.numel() for p in model.parameters())


def load_trained(args):
    """A trained masked checkpoint (--ckpt): (model, parameters, vocabulary, MASK id, prompt [1, P]).

    Attention runs on the dense kernel as in the random-weights rows; the prompt is the first P
    tokens of the builtin validation text (Shakespeare)."""
    import torch

    from dlm_megatron.data.corpus import load_builtin_documents
    from dlm_megatron.generate import load_model
    from dlm_megatron.model.attention import CoreAttention

    model, tok, cfg, meta = load_model(args.ckpt)
    for m in model.modules():
        if isinstance(m, CoreAttention):
            m.backend = "dense"
    ids = tok.encode(load_builtin_documents("val")[0]["text"][:50000])[: args.prompt_length]
    assert len(ids) == args.prompt_length, "validation text too short for --prompt-length"
    args.layers, args.hidden, args.vocab = cfg.model.num_layers, cfg.model.hidden_size, meta["vocab_size"]
    return model, sum(p.numel() for p in model.parameters()), meta["vocab_size"], tok.mask_id, torch.tensor([ids])


def accuracy(fn, prompt, mask_id, scfg, outs):
    """Run the cached sampler once with every cached step checked against a full forward.
    -> (mean |logit difference|, argmax agreement over the block's masked positions, cached steps)"""
    from dlm_megatron.sampling import generate

    diffs, agree, n = [], [], [0]

    def on_refresh(runner, x, lo, hi):
        if getattr(runner, "_wrapped", False):
            return
        inner = runner.block_logits

        def checked(x_BS, lo, hi, need_L=None):
            cached = inner(x_BS, lo, hi, need_L)  # logits of the masked positions (0 at unneeded ones)
            full = fn(x_BS)[:, lo:hi]
            masked = x_BS[:, lo:hi] == mask_id
            diffs.append((cached - full).abs().mean(-1)[masked])
            agree.append((cached.argmax(-1) == full.argmax(-1))[masked])
            n[0] += 1
            return cached

        runner.block_logits, runner._wrapped = checked, True

    out = generate(fn, prompt, mask_id, scfg, on_refresh=on_refresh)
    import torch

    assert torch.equal(out, outs["dual + threshold"]), "the checked run must be the timed run"
    return float(torch.cat(diffs).mean()), float(torch.cat(agree).double().mean()), n[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="model.num_layers")
    ap.add_argument("--hidden", type=int, default=512, help="model.hidden_size (FFN 8/3 of it)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of the random model (last id is MASK)")
    ap.add_argument("--prompt-length", type=int, default=16, help="prompt tokens P")
    ap.add_argument("--gen-length", type=int, default=256, help="tokens to generate")
    ap.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block (Fast-dLLM: 32)")
    ap.add_argument("--steps", type=int, default=None, help="N, total steps of both samplers (default: gen-length)")
    ap.add_argument("--threshold", type=float, default=0.9, help="parallel_threshold TAU (Fast-dLLM: 0.9)")
    ap.add_argument("--output-scale", type=float, default=1.0, help="output-layer multiplier of the random model")
    ap.add_argument("--ckpt", default=None, help="time a trained masked checkpoint (run directory or checkpoint folder) "
                    "instead of random weights: its weights, vocabulary and MASK id, dense attention, prompt = the first "
                    "P tokens of the builtin validation text (--layers/--hidden/--vocab/--output-scale are ignored)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per variant (median reported)")
    ap.add_argument("--with-uncached-threshold", action="store_true", help="also time cache none + threshold")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)

    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import torch

    from dlm_megatron.sampling import SamplerConfig, generate, model_logits_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt:
        model, n_params, vocab, mask_id, prompt = load_trained(args)
        fn = model_logits_fn(model, vocab)
    else:
        model, n_params = build(args)
        mask_id = args.vocab - 1
        fn = model_logits_fn(model, args.vocab)
        prompt = torch.randint(0, mask_id, (1, args.prompt_length), generator=torch.Generator().manual_seed(1))
    base = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps or args.gen_length, seed=0)
    variants = {"LLaDA uncached": SamplerConfig(**base),
                "dual + threshold": SamplerConfig(**base, cache="dual", parallel_threshold=args.threshold)}
    if args.with_uncached_threshold:
        variants["none + threshold"] = SamplerConfig(**base, parallel_threshold=args.threshold)
    outs, forwards = {}, {}

    def run(name):
        def go():
            calls = [0]
            outs[name] = generate(fn, prompt, mask_id, variants[name], progress=lambda *_: calls.__setitem__(0, calls[0] + 1))
            forwards[name] = calls[0]
        return go

    run("dual + threshold")()  # warm-up
    # Wall time and this process's CPU time: on a shared machine the wall time includes waiting
    # for a core, while the CPU time (one intra-op thread) is the work done.
    times, cpu = {k: [] for k in variants}, {k: [] for k in variants}
    for _ in range(args.repeats):
        for k in variants:
            t, c = time.perf_counter(), time.process_time()
            run(k)()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    diff, argmax_agree, cached_steps = accuracy(fn, prompt, mask_id, variants["dual + threshold"], outs)
    P = args.prompt_length
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}; {datetime.date.today().isoformat()}; "
          f"masked denoiser {args.layers} x {args.hidden} (vocab {args.vocab}, {n_params / 1e6:.1f}M parameters), "
          f"{'checkpoint ' + args.ckpt if args.ckpt else f'random weights, output scale {args.output_scale}'}, fp32; prompt {P}, {args.gen_length} new tokens, block {args.block_length}, "
          f"N = {base['steps']}, tau = {args.threshold}; medians of {args.repeats}")
    print("\n| variant | steps run | median CPU time | tokens/s (CPU) | speed-up (CPU) | median wall time | tokens/s (wall) "
          "| speed-up (wall) | wall times |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, m in med.items():
        c = med_cpu[k]
        print(f"| {k} | {forwards[k]} | {c:.3f} s | {args.gen_length / c:.2f} | {med_cpu['LLaDA uncached'] / c:.2f}x | "
              f"{m:.3f} s | {args.gen_length / m:.2f} | {med['LLaDA uncached'] / m:.2f}x | {', '.join(f'{t:.1f}' for t in times[k])} |")
    print(f"\ncached steps checked: {cached_steps}; mean |logit difference| vs a full forward: {diff:.4g}; "
          f"argmax agreement at masked block positions: {argmax_agree:.4f}")
    for k in outs:
        if k != "dual + threshold":
            same = (outs[k][:, P:] == outs["dual + threshold"][:, P:]).double().mean().item()
            print(f"token agreement of dual + threshold with {k}: {same:.4f}")
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
