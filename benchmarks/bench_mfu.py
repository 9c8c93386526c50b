"""Training throughput and MFU of a preset on one device, through the real trainer.

usage: python benchmarks/bench_mfu.py [--config configs/1b.yaml] [--steps 30] [--out FILE.json] [key=value ...]

Trains the preset for --steps steps on the builtin corpus (the tokenizer only changes the
vocabulary size, which the FLOP count accounts for), then reports the median tokens/s and
MFU of the steps after warm-up, read back from metrics.jsonl. MFU = tokens/s x training
FLOPs per token (6 x matmul params + attention) / device peak (bf16 dense: 989 TFLOP/s for
H100/H200; DLM_PEAK_TFLOPS overrides).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/1b.yaml", help="preset to benchmark")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps to run")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the median")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dlm_megatron.train", a.config, f"train.steps={a.steps}", f"train.output_dir={tmp}/run",
               "train.save_interval=0", "train.save_at_end=false", "train.eval_interval=0", "train.sample_at_end=false", "logging.wandb=disabled",
               "logging.log_interval=1", "data.tokenizer=builtin", "data.train_path=builtin:shakespeare/train",
               "data.val_path=null", "train.warmup_steps=2", *a.overrides]
        p = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
            return p.returncode
        rows = [json.loads(l) for l in Path(tmp, "run", "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("split") != "val" and r["step"] > a.warmup]
    res = {"config": a.config, "overrides": a.overrides, "steps_measured": len(rows),
           "tokens_per_sec_median": statistics.median(r["tokens_per_sec"] for r in rows),
           "mfu_median": statistics.median(r["mfu"] for r in rows),
           "mem_gib_max": max(r["mem_gib"] for r in rows)}
    print(f"| config | tokens/s (median) | MFU (median) | peak mem GiB |\n|---|---|---|---|\n"
          f"| {a.config} {' '.join(a.overrides)} | {res['tokens_per_sec_median']:,.0f} | {100 * res['mfu_median']:.1f}% | {res['mem_gib_max']:.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
