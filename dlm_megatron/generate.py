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
    ``shift``: the model was trained with diffusion.shift_logits (token i read from output i-1).
    The function carries the model, so generate.cache=prefix|dual can run parts of it."""
    from .sampling import model_logits_fn

    return model_logits_fn(module, vocab_size, shift)


# generate.* keys that are sampler knobs (SamplerConfig fields of the same name)
SAMPLER_KEYS = ("steps", "gen_length", "block_length", "temperature", "temperature_schedule", "remasking",
                "confidence_threshold", "acceptance_profile", "renoise_profile", "renoise_eta", "renoise_t_on",
                "renoise_t_off", "renoise_alpha_on", "renoise_prob", "cache", "parallel_threshold", "cfg_scale",
                "stop_at_eos", "seed")
# knobs only the masked / block samplers have (uniform, hybrid and continuous refuse them)
MASKED_ONLY = {"acceptance_profile": "linear", "renoise_profile": "none", "renoise_prob": 0.0, "cache": "none",
               "parallel_threshold": None, "cfg_scale": 0.0, "stop_at_eos": False}


def sampler_config(cfg: Config, **over):
    from .sampling import SamplerConfig

    g = cfg.generate
    kw = {k: getattr(g, k) for k in SAMPLER_KEYS}
    kw.update({k: v for k, v in over.items() if v is not None})
    return SamplerConfig(**kw)


def _refuse_masked_only(scfg, objective: str) -> None:
    for k, default in MASKED_ONLY.items():
        if getattr(scfg, k) != default:
            raise ConfigError(f"generate.{k} (--{k.replace('_', '-')}) applies to masked and block checkpoints, "
                              f"not diffusion.objective={objective}")


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
            _refuse_masked_only(scfg, "continuous")
            ccfg = ContinuousSamplerConfig(steps=scfg.steps, gen_length=scfg.gen_length, sigma_min=cfg.diffusion.sigma_min,
                                           sigma_max=cfg.diffusion.sigma_max, temperature=scfg.temperature or 1.0, seed=scfg.seed)
            out = generate_continuous(module, x, tok.vocab_size, ccfg)
        elif cfg.diffusion.objective in ("uniform", "hybrid"):
            # Uniform / hybrid noise: ancestral sampler over the whole generation (sampling/uniform.py).
            from .sampling.uniform import generate_uniform

            scfg = sampler_config(cfg, **over)
            _refuse_masked_only(scfg, cfg.diffusion.objective)
            out = generate_uniform(logits_fn_for(module, tok.vocab_size), x, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                                   gen_length=scfg.gen_length, steps=scfg.steps,
                                   p_uniform=1.0 if cfg.diffusion.objective == "uniform" else cfg.diffusion.p_uniform,
                                   temperature=scfg.temperature if scfg.temperature > 0 else 1.0, seed=scfg.seed,
                                   suppress_ids=(tok.pad_id,))
        elif cfg.diffusion.objective == "block":
            # Block-diffusion checkpoints: KV-cached semi-AR sampler on the trained block grid.
            from .sampling import generate_blocks

            scfg = sampler_config(cfg, **dict(over, block_length=cfg.diffusion.block_size))
            if scfg.cache != "none":
                raise ConfigError(f"generate.cache={scfg.cache} (--cache) is the masked sampler's Fast-dLLM cache; block-diffusion "
                                  f"checkpoints always cache finished blocks exactly: leave it at none")
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
    cfg.parallel.sequence_parallel = False  # it splits the sequence over TP ranks: none here
    cfg.parallel.ep = 1  # all experts in this process
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m dlm_megatron.generate", description=__doc__.splitlines()[0],
                 epilog="Every sampler flag defaults to the checkpoint config's generate.* key of the same name "
                        "(underscores); README 'Sampling' has the formulas.",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="run directory (uses its latest checkpoint) or one checkpoint folder")
    ap.add_argument("--prompt", default=None, help="prompt text (default: generate.prompt)")
    ap.add_argument("--gen-length", type=int, default=None, help="tokens to generate (default: generate.gen_length)")
    ap.add_argument("--steps", type=int, default=None, help="total denoising steps N, split evenly over the blocks (default: generate.steps)")
    ap.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block length, divides --gen-length (default: generate.block_length; block checkpoints use their diffusion.block_size)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature T0, 0 = greedy (default: generate.temperature, 0)")
    ap.add_argument("--temperature-schedule", default=None, choices=("constant", "linear", "cosine"),
                    help="temperature at noise level t: constant T0, linear T0*t, cosine T0*(1-cos(pi t))/2 (default: constant)")
    ap.add_argument("--remasking", default=None, choices=("low_confidence", "random", "margin", "entropy"), help="which predictions are committed first (default: low_confidence)")
    ap.add_argument("--acceptance-profile", default=None, choices=("linear", "cosine"),
                    help="fraction of a block committed after step n of K: linear n/K, cosine 1-cos(pi/2 n/K) (default: linear)")
    ap.add_argument("--renoise-profile", default=None, choices=("none", "constant", "cap", "rescale", "loop"),
                    help="ReMDM remasking of committed tokens: none; constant eta; cap min(eta,(1-a_s)/a_t); "
                         "rescale eta*min(1,(1-a_s)/a_t); loop eta while t_off < t <= t_on (default: none)")
    ap.add_argument("--renoise-eta", type=float, default=None, help="eta of --renoise-profile (default: generate.renoise_eta, 0.02)")
    ap.add_argument("--renoise-t-on", type=float, default=None, help="loop: noise level where remasking starts (default: 0.55)")
    ap.add_argument("--renoise-t-off", type=float, default=None, help="loop: noise level where remasking ends (default: 0.05)")
    ap.add_argument("--renoise-alpha-on", type=float, default=None, help="loop: committed fraction held during the loop (default: 0.9)")
    ap.add_argument("--renoise-prob", type=float, default=None, help="alias: --renoise-profile constant --renoise-eta P (default: 0 = off)")
    ap.add_argument("--confidence-threshold", type=float, default=None,
                    help="also commit every position at least this confident, on top of the step schedule (the block still has K steps; default: off)")
    ap.add_argument("--parallel-threshold", type=float, default=None,
                    help="Fast-dLLM: commit every position at least this confident and at least one, ignoring the step schedule (default: off)")
    ap.add_argument("--cache", default=None, choices=("none", "prefix", "dual"),
                    help="Fast-dLLM KV cache (masked checkpoints), refreshed when each block starts (default: none)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance W: u + (1+W)(c-u), u with the prompt masked (default: 0 = off)")
    ap.add_argument("--stop-at-eos", default=None, action=argparse.BooleanOptionalAction,
                    help="a committed EOS also fills the rest of its block (changes tokens; default: off)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: generate.seed, 0)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to run on (default: cuda if available, else cpu)")
    return ap


KNOB_FLAGS = ("temperature", "temperature_schedule", "remasking", "acceptance_profile", "renoise_profile", "renoise_eta",
              "renoise_t_on", "renoise_t_off", "renoise_alpha_on", "renoise_prob", "confidence_threshold",
              "parallel_threshold", "cache", "cfg_scale", "stop_at_eos", "seed")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        model, tok, cfg, meta = load_model(args.ckpt, args.device)
        gen_length = args.gen_length or cfg.generate.gen_length
        block = args.block_length or min(cfg.generate.block_length, gen_length)
        knobs = {k: getattr(args, k) for k in KNOB_FLAGS}
        text = sample_text(model, tok, cfg, device=args.device, prompt=args.prompt, gen_length=gen_length,
                           steps=args.steps or (cfg.generate.steps if gen_length == cfg.generate.gen_length else gen_length),
                           block_length=block, **knobs)
    except (ConfigError, CheckpointError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, ValueError) and not isinstance(e, (ConfigError, CheckpointError)):  # the sampler's: name its flags
            import re

            keys = sorted(KNOB_FLAGS + ("steps", "gen_length", "block_length"), key=len, reverse=True)
            msg = re.sub(r"\b(" + "|".join(keys) + r")\b(?![=.])", lambda m: "--" + m.group(1).replace("_", "-"), msg)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
