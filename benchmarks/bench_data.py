"""Data-layer throughput: tools/shard.py vs the bare tokenizer, and the loader vs training.

usage: python benchmarks/bench_data.py [--workers 2] [--repeats 5] [--steps 2000]
                                      [--repeat-corpus 8] [--out FILE.json]

1. Sharding: the builtin Shakespeare corpus (all 42 works) is written as a JSONL file, then
   - shard: `python tools/shard.py --input corpus.jsonl --workers W` end to end (a fresh
     process: interpreter start, imports, reading, tokenizing, writing shards + sha256);
     its own reported in-process time is recorded too;
   - bare: the same texts encoded with `Tokenizer.encode_batch` in a pool of W processes
     (same chunks as shard.py; pool start and tokenizer loading included, nothing written;
     its workers import only the tokenizer, like shard.py's).
   Ratio = shard tokens/s / bare tokens/s (goal >= 0.9). The 1x corpus takes only a few
   seconds, so start-up dominates; the same is measured again on the corpus repeated
   --repeat-corpus times (one JSONL of N copies; results under "x{N}_...").
2. Loader: PackedDataset(builtin train, seq_len) + sample_indices for consecutive steps of
   the tiny config's global batch, gathering each batch like train.py does (np.stack of
   train_ds[i]). Compared with what tiny training consumes on the CPU (--train-tok-s).
Every number is the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Light module-level imports only: the bare pool's spawned workers import this file as
# __mp_main__, and they should load no more than the tokenizer (as shard.py's do).
from dlm_megatron.data import load_tokenizer  # noqa: E402
from dlm_megatron.data.encode_pool import CHUNK_CHARS, CHUNK_DOCS, chunk_texts  # noqa: E402

_TOK = None


def _init(path: str) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = load_tokenizer(path)


def _encode(chunk: list[str]) -> int:
    return sum(len(ids) for ids in _TOK.encode_batch(chunk))


def bare_tokenizer(texts: list[str], tok_path: str, workers: int) -> tuple[float, int]:
    """Seconds and tokens to encode `texts` with encode_batch in `workers` processes."""
    chunks = list(chunk_texts(texts, CHUNK_CHARS, CHUNK_DOCS))  # shard.py's chunking
    start = time.perf_counter()
    if workers <= 1:
        _init(tok_path)
        tokens = sum(_encode(c) for c in chunks)
    else:
        with multiprocessing.get_context("spawn").Pool(workers, _init, (tok_path,)) as pool:
            tokens = sum(pool.map(_encode, chunks, chunksize=1))
    return time.perf_counter() - start, tokens


def shard_cli(src: Path, out: Path, workers: int) -> tuple[float, float, int]:
    """(wall seconds, in-process seconds, tokens) of one tools/shard.py run."""
    cmd = [sys.executable, str(REPO / "tools" / "shard.py"), "--input", str(src), "--output",
           str(out), "--workers", str(workers), "--overwrite", "--no-resume", "--no-progress"]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    m = re.search(r"wrote \d+ docs, (\d+) tokens .*? \(([\d.]+)s", result.stdout)
    return wall, float(m.group(2)), int(m.group(1))


def loader_rate(shard_dir: str, seq_len: int, eot: int, G: int, steps: int) -> float:
    """Tokens/s of building `steps` consecutive global batches."""
    import numpy as np

    from dlm_megatron.data import PackedDataset, sample_indices

    ds = PackedDataset(shard_dir, seq_len, eot)
    start = time.perf_counter()
    for step in range(steps):
        idx = sample_indices(step, G, len(ds), 1234)
        np.stack([ds[int(i)] for i in idx])
    return steps * G * seq_len / (time.perf_counter() - start)


def shard_vs_bare(texts: list[str], tmp: Path, tok_path: str, workers: int,
                  repeats: int) -> dict:
    """Medians of interleaved bare / shard.py runs on `texts` (written as one JSONL)."""
    src = tmp / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bare, wall, inproc = [], [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both
        secs, tokens = bare_tokenizer(texts, tok_path, workers)
        bare.append(tokens / secs)
        w, p, n = shard_cli(src, tmp / "out", workers)
        assert n == tokens, (n, tokens)
        wall.append(n / w)
        inproc.append(n / p)
    res = {"docs": len(texts), "chars": sum(len(t) for t in texts), "tokens": tokens,
           "bare_s": tokens / statistics.median(bare),
           "bare_tok_s": statistics.median(bare),
           "shard_wall_tok_s": statistics.median(wall),
           "shard_inproc_tok_s": statistics.median(inproc)}
    res["ratio_wall"] = res["shard_wall_tok_s"] / res["bare_tok_s"]
    res["ratio_inproc"] = res["shard_inproc_tok_s"] / res["bare_tok_s"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2000, help="loader: global batches per repeat")
    ap.add_argument("--repeat-corpus", type=int, default=8, metavar="N",
                    help="also shard the corpus repeated N times, so start-up is amortised "
                    "(N=8: ~40 M chars, the bare run takes ~15-20 s on 2 cores); "
                    "1 = only the 1x corpus")
    ap.add_argument("--seq-len", type=int, default=128, help="tiny config: data.seq_len")
    ap.add_argument("--global-batch", type=int, default=16, help="tiny config: global batch")
    ap.add_argument("--train-tok-s", type=float, default=2600.0,
                    help="tokens/s the tiny config trains at on this CPU")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from dlm_megatron.data import corpus as corpus_mod
    from dlm_megatron.data import prepare_builtin_corpus

    tok = load_tokenizer("builtin")
    texts = [d["text"] for d in corpus_mod.load_builtin_documents("all")]
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "python": platform.python_version(), "workers": a.workers,
                 "repeats": a.repeats, "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("", 1)] + ([(f"x{a.repeat_corpus}_", a.repeat_corpus)]
                            if a.repeat_corpus > 1 else [])
        for prefix, n in runs:
            (Path(tmp) / prefix).mkdir(exist_ok=True)
            part = shard_vs_bare(texts * n, Path(tmp) / prefix, str(tok.path), a.workers,
                                 a.repeats)
            res.update({prefix + k: v for k, v in part.items()})

        train_dir = prepare_builtin_corpus(Path(tmp) / "cache", tok, verbose=False)["train"]
        rates = [loader_rate(train_dir, a.seq_len, tok.eot_id, a.global_batch, a.steps)
                 for _ in range(a.repeats)]
        res["loader_tok_s"] = statistics.median(rates)
        res["train_tok_s"] = a.train_tok_s
        res["loader_headroom"] = res["loader_tok_s"] / a.train_tok_s
    res["load_avg_after"] = os.getloadavg()
    for k, v in res.items():
        print(f"{k:24s} {v:,.2f}" if isinstance(v, float) else f"{k:24s} {v}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
