"""Step time of the steps that trigger a checkpoint save vs normal steps (issue 12 item 3).

usage: python benchmarks/bench_save.py [--models tiny,100m] [--steps 20] [--interval 3] [--engine deepspeed|megatron]
                                      [--out FILE.json]
       torchrun --nproc_per_node 2 benchmarks/bench_save.py --engine megatron ...   (DP2: rank 0 reports)

Trains in this process (the real trainer: DeepSpeed ZeRO-0 or, with --engine megatron, the
megatron-core engine with its distributed optimizer; fp32 on CPU) with a save every
--interval steps, twice per model: ``train.async_save=true`` (the saving step only copies
the state to host memory; a background thread writes and fsyncs it, rank 0 commits it at a
later step) and ``train.async_save=false`` (the files are written before the next step).
A step's time is the wall time between the starts of consecutive steps, so it includes the
save (staging, or the whole write) and the per-step all-reduce that commits a finished
save. Reported: the median over the save-triggering steps (at least 5) and over the other
steps (the first step, and the one after it while caches warm, are left out), and their
ratio. Goal: async ratio <= 1.3.

Models: ``tiny`` is configs/tiny.yaml (~7M parameters); ``100m`` is configs/125m.yaml's
width (12 layers x 768, ffn 2048) with the builtin 8k tokenizer: ~98M parameters, so about
1.2 GB of weights + Adam moments are staged and written per save, at seq 256 and a
global batch of 4.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "tiny": ("configs/tiny.yaml", []),
    "100m": ("configs/125m.yaml", ["data.train_path=builtin:shakespeare/train", "data.tokenizer=builtin", "data.seq_len=256",
                                   "train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=fp32",
                                   "parallel.zero_stage=0"]),
}


def run(model: str, async_save: bool, steps: int, interval: int, out: Path, engine: str = "deepspeed") -> dict:
    from dlm_megatron import train
    from dlm_megatron.config import load_config

    path, extra = MODELS[model]
    cfg = load_config(str(REPO / path), extra + [
        f"train.steps={steps}", f"train.save_interval={interval}", "train.save_at_end=false", "train.eval_interval=0",
        "train.sample_at_end=false", "data.val_path=null", "logging.wandb=disabled", "logging.log_interval=1000",
        f"train.async_save={str(async_save).lower()}", "train.keep_last=2", f"train.output_dir={out}",
        f"data.cache_dir={REPO}/.cache/data", f"parallel.engine={engine}"]
        + (["parallel.zero_stage=1"] if engine == "megatron" else []))
    real_step, real_save = train.Trainer.train_step, train.Trainer.save
    starts, staging = [], []

    def timed_step(self, step, mbl=None):
        starts.append(time.perf_counter())
        return real_step(self, step, mbl)

    def timed_save(self, step):
        t0 = time.perf_counter()
        real_save(self, step)
        staging.append(time.perf_counter() - t0)

    train.Trainer.train_step, train.Trainer.save = timed_step, timed_save
    try:
        trainer = train.Trainer(cfg)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        trainer.fit()
    finally:
        train.Trainer.train_step, train.Trainer.save = real_step, real_save
    # step k (0-based) runs from starts[k] to starts[k+1]; it saves when (k + 1) % interval == 0
    times = {k: b - a for k, (a, b) in enumerate(zip(starts, starts[1:]))}
    save = [t for k, t in times.items() if (k + 1) % interval == 0]
    normal = [t for k, t in times.items() if (k + 1) % interval != 0 and k >= 2]
    ckpt, size = out / "checkpoints", 0
    if int(os.environ.get("RANK", "0")) == 0:  # the other ranks may still be finishing; rank 0 reports
        size = sum(f.stat().st_size for f in (ckpt / (ckpt / "latest").read_text().strip()).rglob("*") if f.is_file())
        shutil.rmtree(out, ignore_errors=True)
    return {"params_M": round(n_params / 1e6, 1), "checkpoint_MB": round(size / 1e6, 1), "saves": len(save),
            "median_save_step_s": round(statistics.median(save), 4), "median_normal_step_s": round(statistics.median(normal), 4),
            "ratio": round(statistics.median(save) / statistics.median(normal), 3),
            "median_save_call_s": round(statistics.median(staging), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,100m", help="comma-separated: tiny, 100m (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="steps per run (default: %(default)s)")
    ap.add_argument("--interval", type=int, default=3, help="train.save_interval (default: %(default)s)")
    ap.add_argument("--engine", default="deepspeed", choices=["deepspeed", "megatron"],
                    help="parallel.engine (megatron: distributed optimizer, zero_stage=1; default: %(default)s)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank writes into one run folder
        tmp = Path(os.environ.get("BENCH_TMP", tempfile.gettempdir())) / f"bench_save_{os.environ['MASTER_PORT']}"
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_save_", dir=os.environ.get("BENCH_TMP")))
    res = {}
    for model in args.models.split(","):
        for mode in ("async", "sync"):
            out = tmp / f"{model}_{mode}"
            res[f"{model} {mode}"] = r = run(model, mode == "async", args.steps, args.interval, out, args.engine)
            if rank0:
                print(f"{model} {mode}: {r}", flush=True)
    summary = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "save_interval": args.interval,
               "engine": args.engine, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "results": res, "load_avg_1min": os.getloadavg()[0]}
    if rank0:
        print(json.dumps(summary, indent=1))
    if args.out and rank0:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
