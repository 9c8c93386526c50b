#!/usr/bin/env python
"""Convert dlm_megatron checkpoints: export to Hugging Face / GGUF, import from Hugging Face, reshard.

Examples:
    # export a run's latest checkpoint (any TP/PP layout) for transformers (trust_remote_code)
    python tools/convert.py --ckpt runs/tiny --to hf --output exports/tiny-hf
    # llama.cpp (architecture llada); --dtype f32|f16|bf16|q8_0
    python tools/convert.py --ckpt runs/tiny --to gguf --output exports/tiny-q8.gguf --dtype q8_0
    # causal (diffusion.objective=ar) checkpoint -> standard LlamaForCausalLM folder
    python tools/convert.py --ckpt runs/ar --to hf-llama --output exports/ar-llama
    # import a Llama / Qwen2 safetensors checkpoint as a weights-only run directory
    python tools/convert.py --from-hf path/to/llama --output runs/llama-init --tp 2 --pp 1
    # rewrite a checkpoint for another layout (optimizer state restarts)
    python tools/convert.py reshard --ckpt runs/big --output runs/big-tp4 --tp 4 --pp 2

Errors are printed as one line and exit with status 2. See docs/export.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

HF_DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python tools/convert.py", description=__doc__.strip(),
                 epilog="Subcommand: 'python tools/convert.py reshard --help' rewrites a checkpoint for another TP/PP layout.",
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH", help="export: a run directory (its latest checkpoint) or one checkpoint folder, any TP/PP layout")
    src.add_argument("--from-hf", metavar="DIR", help="import: a Hugging Face Llama- or Qwen2-style folder (config.json + model.safetensors[.index.json]); "
                                                            "q/k/v biases set model.add_qkv_bias")
    ap.add_argument("--to", choices=("hf", "hf-llama", "gguf"),
                    help="export format (with --ckpt): hf = our modeling code in LLaDA's layout (AutoModel, trust_remote_code); "
                         "hf-llama = standard LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v have biases (causal checkpoints only); "
                         "gguf = llama.cpp 'llada' file ('dream' when q/k/v have biases, 'llada-moe' for mixture-of-experts checkpoints)")
    ap.add_argument("--output", required=True, metavar="PATH",
                    help="hf/hf-llama: a folder; gguf: a .gguf file; --from-hf: a run directory (checkpoints/step_000000 + latest)")
    ap.add_argument("--dtype", default=None,
                    help=f"weight type: hf/hf-llama {'|'.join(HF_DTYPES)} (default float32 for hf; 'auto' for hf-llama = the "
                         f"imported model's dtype, else float32); gguf {'|'.join(GGUF_DTYPES)} (default f32; norms always f32)")
    ap.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="hf/hf-llama: split model.safetensors into shards of at most this size with an index (e.g. 5GB, 500MB, 2GiB)")
    ap.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                    help="gguf: llama.cpp pre-tokenizer name (default: detected from tokenizer.json, e.g. gpt-2)")
    ap.add_argument("--tp", type=int, default=1, help="--from-hf: tensor-parallel size of the written checkpoint")
    ap.add_argument("--pp", type=int, default=1, help="--from-hf: pipeline-parallel size of the written checkpoint")
    ap.add_argument("--tokenizer", default=None, metavar="FILE",
                    help="--from-hf: tokenizer.json to use (default DIR/tokenizer.json); the framework's special tokens "
                         "<|endoftext|>, <|mask|>, <|pad|> are appended (new embedding rows = mean embedding) if missing")
    ap.add_argument("--objective", default="ar", choices=("ar", "masked", "block", "uniform", "hybrid"),
                    help="--from-hf: diffusion.objective recorded in the imported config (ar: the model as trained, causal)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="--from-hf: data.seq_len recorded in the config (default min(max_position_embeddings, 4096))")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only when stderr is a terminal)")
    return ap


def build_reshard_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python tools/convert.py reshard",
                 description="Rewrite a checkpoint's model shards for another TP/PP layout. Reads any training layout "
                             "without its world size. The output is a run directory whose checkpoint keeps the step but "
                             "has engine: null (weights only): optimizer state restarts when training resumes from it.")
    ap.add_argument("--ckpt", required=True, metavar="PATH", help="a run directory (its latest checkpoint) or one checkpoint folder")
    ap.add_argument("--output", required=True, metavar="DIR", help="run directory to write (checkpoints/step_XXXXXX + latest + config.yaml)")
    ap.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    ap.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    ap.add_argument("--ep", type=int, default=1, help="target expert-parallel size (mixture-of-experts models; default 1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only when stderr is a terminal)")
    return ap


def _bars(args) -> bool:
    """Progress bars on an interactive terminal only (never in logs or captured output)."""
    return not args.quiet and sys.stderr.isatty()


def _run(argv: list[str]) -> str:
    if argv and argv[0] == "reshard":
        a = build_reshard_parser().parse_args(argv[1:])
        from dlm_megatron.convert.reshard import reshard

        path = reshard(a.ckpt, a.output, tp=a.tp, pp=a.pp, ep=a.ep, overwrite=a.overwrite, show_progress=_bars(a))
        return f"wrote tp={a.tp} pp={a.pp} checkpoint {path} (weights only: optimizer state restarts)"

    ap = build_parser()
    a = ap.parse_args(argv)
    show = _bars(a)
    if a.from_hf:
        if a.to:
            ap.error("--to is for exports (--ckpt); --from-hf imports")
        if a.dtype:
            ap.error("--dtype is for exports; imported weights are stored in fp32")
        from dlm_megatron.convert.hf import import_hf

        path = import_hf(a.from_hf, a.output, tp=a.tp, pp=a.pp, tokenizer=a.tokenizer, objective=a.objective,
                         seq_len=a.seq_len, overwrite=a.overwrite, show_progress=show)
        return f"imported {a.from_hf} -> {path} (tp={a.tp} pp={a.pp}, weights only; train with train.init_from={a.output})"
    if not a.to:
        ap.error("--ckpt needs --to hf|hf-llama|gguf")
    if a.tp != 1 or a.pp != 1:
        ap.error("--tp/--pp apply to --from-hf; to change a checkpoint's layout use 'tools/convert.py reshard'")
    if a.to == "gguf":
        dtype = a.dtype or "f32"
        if dtype not in GGUF_DTYPES:
            ap.error(f"--dtype {dtype} is not a GGUF type (choose from {', '.join(GGUF_DTYPES)})")
        from dlm_megatron.convert.gguf import export_gguf

        path = export_gguf(a.ckpt, a.output, dtype=dtype, tokenizer_pre=a.tokenizer_pre, overwrite=a.overwrite, show_progress=show)
        return f"wrote {path} ({dtype})"
    dtype = a.dtype or ("float32" if a.to == "hf" else "auto")
    if dtype not in HF_DTYPES or (a.to == "hf" and dtype == "auto"):
        ap.error(f"--dtype {dtype} is not valid for --to {a.to} (choose from {', '.join(HF_DTYPES[a.to == 'hf':])})")
    from dlm_megatron.convert import hf

    fn = hf.export_hf if a.to == "hf" else hf.export_hf_llama
    path = fn(a.ckpt, a.output, dtype=dtype, max_shard_size=a.max_shard_size, overwrite=a.overwrite, show_progress=show)
    return f"wrote {path} ({a.to}, {dtype})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from dlm_megatron.checkpoint import CheckpointError
    from dlm_megatron.config import ConfigError
    from dlm_megatron.convert import ConvertError
    from dlm_megatron.data import DataError

    try:
        msg = _run(argv)
    except (ConvertError, CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ...
        print(f"error: {e.strerror or e} ({e.filename or ''})", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e} (install it: pip install {e.name or 'the missing package'})", file=sys.stderr)
        return 2
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
