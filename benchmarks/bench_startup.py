"""Training start-up against corpus size: time to the first step and peak RSS.

usage: python benchmarks/bench_startup.py [--sizes 64M,2G] [--root DIR] [--repeats 3]
                                          [--repo PATH] [--out FILE.json]

1. Corpora: for each size, random token ids (the builtin tokenizer's vocabulary, uint16;
   document lengths drawn from a geometric distribution with mean 1000 tokens) written by
   the project's shard writer (`write_shards`, megatron format, default 128 Mi-token
   shards) into ROOT/corpus-SIZE, once (reused by later invocations).
2. Start-up: `python -m dlm_megatron.train configs/tiny.yaml` on that corpus (train.steps=1,
   no validation, no save, no sample) as a fresh process with a fresh data.cache_dir:
   - first run: builds the index cache (document ends, the epoch permutation);
   - cached runs (--repeats): map it.
   Measured per run: seconds from process start until the first "step 1" line, and the
   process's peak RSS (ru_maxrss from wait4). Reported: the first run and the median of the
   cached runs, per size, and the ratio large / small (goal <= 1.2 for both figures).
--repo runs another checkout's trainer instead (e.g. the code before the index cache) with
the same interpreter, for a before/after comparison; its first and later runs are alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MEAN_DOC_TOKENS = 1000


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "KMG" else text) * mult)


def write_corpus(out: Path, num_tokens: int) -> None:
    """Random documents totalling about num_tokens tokens, written with write_shards."""
    import numpy as np

    from dlm_megatron.data import load_tokenizer, write_shards

    if (out / "manifest.json").is_file():
        return
    tok = load_tokenizer(None)
    rng = np.random.default_rng(0)

    def docs():
        left = num_tokens
        while left > 0:
            # draw lengths and ids for many documents at once (per-document numpy calls
            # would dominate at 2M documents)
            lengths = np.minimum(rng.geometric(1 / MEAN_DOC_TOKENS, 4096), 32768)
            ids = rng.integers(0, tok.vocab_size - 3, int(lengths.sum()), dtype=np.uint16)
            start = 0
            for n in lengths:
                n = int(min(n, left))
                yield ids[start:start + n]
                start += n
                left -= n
                if left <= 0:
                    return

    t0 = time.time()
    write_shards(docs(), out, tok, "megatron", overwrite=True)
    print(f"wrote {out} ({num_tokens / 1e9:.2f}G tokens) in {time.time() - t0:.0f}s", flush=True)


def start_once(repo: Path, corpus: Path, cache: Path, run_dir: Path) -> dict:
    """One training process until its first step: seconds to the step line, peak RSS."""
    cmd = [sys.executable, "-m", "dlm_megatron.train", str(repo / "configs/tiny.yaml"),
           f"data.train_path={corpus}", "data.val_path=null", f"data.cache_dir={cache}",
           f"train.output_dir={run_dir}", "train.steps=1", "train.save_at_end=false", "train.sample_at_end=false",
           "train.eval_interval=0", "logging.wandb=disabled", "logging.log_interval=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(repo))
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_step is None and line.lstrip().startswith("step") and "loss" in line:
            first_step = time.perf_counter() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or first_step is None:
        raise SystemExit(f"training failed ({status}):\n{''.join(lines[-20:])}")
    built = [ln.strip() for ln in lines if ln.startswith("data index:")]
    return {"seconds_to_first_step": round(first_step, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "index": built[0] if built else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64M,2G", help="corpus sizes in tokens, comma-separated (default: %(default)s)")
    ap.add_argument("--root", default="/tmp/dlm_bench_startup", help="where corpora and caches go (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="cached runs per size (default: %(default)s)")
    ap.add_argument("--repo", default=str(REPO), help="checkout whose trainer is started (default: this one)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    root, repo = Path(args.root), Path(args.repo).resolve()
    sizes = [(s, parse_size(s)) for s in args.sizes.split(",")]
    for label, n in sizes:
        write_corpus(root / f"corpus-{label}", n)
    results = {}
    for label, _ in sizes:
        corpus, cache = root / f"corpus-{label}", root / f"cache-{label}"
        shutil.rmtree(cache, ignore_errors=True)
        first = start_once(repo, corpus, cache, root / "run")
        cached = [start_once(repo, corpus, cache, root / "run") for _ in range(args.repeats)]
        results[label] = {"first": first, "cached": cached,
                          "cached_median": {k: statistics.median(r[k] for r in cached)
                                            for k in ("seconds_to_first_step", "peak_rss_mib")}}
        print(f"{label}: first {first}  cached median {results[label]['cached_median']}", flush=True)
    small, large = sizes[0][0], sizes[-1][0]
    ratio = {k: round(results[large]["cached_median"][k] / results[small]["cached_median"][k], 3)
             for k in ("seconds_to_first_step", "peak_rss_mib")}
    summary = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d %H:%M"), "repo": str(repo), "results": results,
               f"ratio_{large}_over_{small}_cached": ratio, "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
