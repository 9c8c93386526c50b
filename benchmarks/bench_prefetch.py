"""Step time with a deliberately slow reader, with and without the background prefetch.

usage: python benchmarks/bench_prefetch.py [--read-ms 200] [--steps 12] [--out FILE.json]

Trains configs/tiny.yaml (the real DeepSpeed ZeRO-0 engine, fp32 on CPU) in this process
three times, with the reader slowed by sleeping --read-ms per step in PackedDataset.__getitem__
(spread over the global batch's samples):
  - baseline: no sleep, data.prefetch=2;
  - slow, inline: the sleep, data.prefetch=0 (the step waits for its data);
  - slow, prefetch: the sleep, data.prefetch=2 (read while the previous step runs).
Reported: the median step time (seconds between consecutive step starts, first step left
out) of each. Hidden means slow+prefetch ~ baseline while slow+inline ~ baseline + read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(read_s: float, prefetch: int, steps: int, out: Path) -> float:
    from dlm_megatron import train
    from dlm_megatron.config import load_config
    from dlm_megatron.data.loader import PackedDataset

    cfg = load_config(str(REPO / "configs/tiny.yaml"), [
        f"train.steps={steps}", "train.save_at_end=false", "train.save_interval=0", "train.eval_interval=0",
        "train.sample_at_end=false", "data.val_path=null", "logging.wandb=disabled", "logging.log_interval=1000",
        f"data.prefetch={prefetch}", f"train.output_dir={out}", f"data.cache_dir={REPO}/.cache/data"])
    real_getitem, real_step = PackedDataset.__getitem__, train.Trainer.train_step
    per_sample = read_s / cfg.train.global_batch_size
    starts = []

    def slow_getitem(self, i):
        time.sleep(per_sample)
        return real_getitem(self, i)

    def timed_step(self, step, mbl=None):
        starts.append(time.perf_counter())
        return real_step(self, step, mbl)

    PackedDataset.__getitem__ = slow_getitem
    train.Trainer.train_step = timed_step
    try:
        train.Trainer(cfg).fit()
    finally:
        PackedDataset.__getitem__, train.Trainer.train_step = real_getitem, real_step
    return statistics.median(b - a for a, b in zip(starts[1:], starts[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--read-ms", type=float, default=200.0, help="reader sleep per step (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default: %(default)s)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prefetch_"))
    read = args.read_ms / 1000
    res = {"baseline": run(0.0, 2, args.steps, tmp / "a"),
           "slow_inline": run(read, 0, args.steps, tmp / "b"),
           "slow_prefetch": run(read, 2, args.steps, tmp / "c")}
    summary = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d %H:%M"), "read_ms_per_step": args.read_ms, "steps": args.steps,
               "median_step_s": {k: round(v, 4) for k, v in res.items()}, "load_avg_1min": os.getloadavg()[0]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()


if __name__ == "__main__":
    main()
