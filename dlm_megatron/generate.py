"""Text generation: ``python -m dlm_megatron.generate --ckpt PATH --prompt TEXT`` (``dlm-generate``).

Loads any checkpoint (whatever TP/PP/ZeRO layout trained it: the model shards are merged
to a full model) into a single-process denoiser and runs the LLaDA-style sampler:
semi-autoregressive blocks, N denoising steps, low-confidence (or other) remasking.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .config import Config, ConfigError, from_dict


def logits_fn_for(module, vocab_size: int, shift: bool = False):
    """Wrap a (TP=1) denoiser as tokens[B,S] -> logits[B,S,V] for the samplers.

    Padded vocabulary rows are cut off so the sampler never proposes a non-token.
    ``shift``: the model was trained with diffusion.shift_logits (token i read from output i-1)."""

    @torch.no_grad()
    def fn(tokens_BS: torch.Tensor) -> torch.Tensor:
        logits = module(tokens_BS, None, None)
        if shift:
            from .diffusion.adaptation import shift_logits

            logits = shift_logits(logits)
        return logits[..., :vocab_size].float()

    return fn


def sampler_config(cfg: Config, **over):
    from .sampling import SamplerConfig

    g = cfg.generate
    kw = dict(steps=g.steps, gen_length=g.gen_length, block_length=g.block_length, temperature=g.temperature,
              remasking=g.remasking, seed=g.seed)
    kw.update({k: v for k, v in over.items() if v is not None})
    return SamplerConfig(**kw)


def sample_text(module, tok, cfg: Config, *, device, prompt: str | None = None, **over) -> str:
    """Generate a completion of ``prompt`` (default cfg.generate.prompt) and decode it."""
    from .sampling import generate

    was_training = module.training
    module.eval()
    try:
        ids = tok.encode(prompt if prompt is not None else cfg.generate.prompt)
        x = torch.tensor([ids], dtype=torch.long, device=device)
        if cfg.diffusion.objective == "continuous":
            # CDCD checkpoints: Euler ODE sampler in embedding space (sampling/continuous.py).
            from .sampling.continuous import ContinuousSamplerConfig, generate_continuous

            scfg = sampler_config(cfg, **over)
            ccfg = ContinuousSamplerConfig(steps=scfg.steps, gen_length=scfg.gen_length, sigma_min=cfg.diffusion.sigma_min,
                                           sigma_max=cfg.diffusion.sigma_max, temperature=scfg.temperature or 1.0, seed=scfg.seed)
            out = generate_continuous(module, x, tok.vocab_size, ccfg)
        elif cfg.diffusion.objective in ("uniform", "hybrid"):
            # Uniform / hybrid noise: ancestral sampler over the whole generation (sampling/uniform.py).
            from .sampling.uniform import generate_uniform

            scfg = sampler_config(cfg, **over)
            out = generate_uniform(logits_fn_for(module, tok.vocab_size), x, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                                   gen_length=scfg.gen_length, steps=scfg.steps,
                                   p_uniform=1.0 if cfg.diffusion.objective == "uniform" else cfg.diffusion.p_uniform,
                                   temperature=scfg.temperature if scfg.temperature > 0 else 1.0, seed=scfg.seed,
                                   suppress_ids=(tok.pad_id,))
        elif cfg.diffusion.objective == "block":
            # Block-diffusion checkpoints: KV-cached semi-AR sampler on the trained block grid.
            from .sampling import generate_blocks

            scfg = sampler_config(cfg, **dict(over, block_length=cfg.diffusion.block_size))
            out = generate_blocks(module, x, tok.mask_id, scfg, vocab_size=tok.vocab_size,
                                  eos_id=tok.eot_id, suppress_ids=(tok.pad_id,))
        else:
            scfg = sampler_config(cfg, **over)
            out = generate(logits_fn_for(module, tok.vocab_size, shift=cfg.diffusion.shift_logits), x, tok.mask_id, scfg,
                           eos_id=tok.eot_id, suppress_ids=(tok.pad_id,))
        gen = out[0, len(ids):].tolist()
        if tok.eot_id in gen:
            gen = gen[: gen.index(tok.eot_id)]
        return tok.decode(ids + gen)
    finally:
        module.train(was_training)


def load_model(ckpt_path: str, device: str = "cpu"):
    """(model, tokenizer, cfg, meta) from a checkpoint, as a single-process TP=1 PP=1 model."""
    from .logging import quiet_warnings

    quiet_warnings()
    from . import checkpoint as ckpt
    from .data.tokenizer import load_tokenizer
    from .model.denoiser import build_model
    from .parallel import dist as pdist

    path = ckpt.resolve(ckpt_path)
    meta = ckpt.read_meta(path)
    cfg = from_dict(meta["config"])
    # Inference runs the merged model in one process whatever the training layout was.
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.zero_stage = 0
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.sha256 != meta["tokenizer_sha256"]:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer} (sha {tok.sha256[:12]}) is not the one this checkpoint was trained with "
                          f"(sha {meta['tokenizer_sha256'][:12]})")
    pdist.init_distributed(cfg)
    model = build_model(cfg, meta["vocab_size"], pre_process=True, post_process=True)
    full = ckpt.load_full_state_dict(path)
    model.load_state_dict(ckpt.local_state_from_full(full, model, cfg, tp_rank=0, pp_rank=0), strict=False)
    model.to(device).eval()
    return model, tok, cfg, meta


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dlm_megatron.generate", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint) or one checkpoint folder")
    ap.add_argument("--prompt", default=None, help="prompt text (default: the config's generate.prompt)")
    ap.add_argument("--gen-length", type=int, default=None, help="tokens to generate (default: config generate.gen_length)")
    ap.add_argument("--steps", type=int, default=None, help="total denoising steps N (default: config generate.steps)")
    ap.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block length (divides gen-length)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature, 0 = greedy")
    ap.add_argument("--temperature-schedule", default=None, choices=("constant", "linear", "cosine"), help="temperature as a function of the noise level")
    ap.add_argument("--remasking", default=None, choices=("low_confidence", "random", "margin", "entropy"), help="which predictions are committed first")
    ap.add_argument("--confidence-threshold", type=float, default=None, help="commit every position at least this confident (parallel decoding)")
    ap.add_argument("--renoise-prob", type=float, default=None, help="probability of re-masking a committed token at each step")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to run on")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        model, tok, cfg, meta = load_model(args.ckpt, args.device)
        gen_length = args.gen_length or cfg.generate.gen_length
        block = args.block_length or min(cfg.generate.block_length, gen_length)
        text = sample_text(model, tok, cfg, device=args.device, prompt=args.prompt, gen_length=gen_length, steps=args.steps or (cfg.generate.steps if gen_length == cfg.generate.gen_length else gen_length),
                           block_length=block, temperature=args.temperature, temperature_schedule=args.temperature_schedule,
                           remasking=args.remasking, confidence_threshold=args.confidence_threshold,
                           renoise_prob=args.renoise_prob, seed=args.seed)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
