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
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def trainer_command(a, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "dlm_megatron.train", a.config, f"train.steps={a.steps}", f"train.output_dir={run_dir}",
            "train.save_interval=0", "train.save_at_end=false", "train.eval_interval=0", "train.sample_at_end=false", "logging.wandb=disabled",
            "logging.log_interval=1", "data.tokenizer=builtin", "data.train_path=builtin:shakespeare/train",
            "data.val_path=null", "train.warmup_steps=2", *a.overrides]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/1b.yaml", help="preset to benchmark")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps to run")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the median")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("--gemm-tflops", type=float, default=None,
                    help="measured bf16 GEMM peak (TFLOP/s) to also quote MFU against (gpu_check.sh passes stage 1's)")
    ap.add_argument("--label", default=None, help="name of this row in the printed table (default: config + overrides)")
    ap.add_argument("--dry-run", action="store_true", help="only check the config and overrides (CPU; no training)")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    a = ap.parse_args(argv)
    if a.steps <= a.warmup:
        ap.error(f"--steps {a.steps} must exceed --warmup {a.warmup}")
    if a.dry_run:
        from dlm_megatron.config import ConfigError, load_config

        try:
            load_config(REPO / a.config, trainer_command(a, "/tmp/x")[4:])
        except ConfigError as e:
            print(f"bench_mfu.py: error: {e}", file=sys.stderr)
            return 2
        print(f"bench_mfu dry run: {a.config} {' '.join(a.overrides)}: config OK")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run(trainer_command(a, f"{tmp}/run"), cwd=REPO, text=True, capture_output=True)
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
            return p.returncode
        head = [l for l in p.stdout.splitlines() if l.startswith(("model:", "note:"))]
        rows = [json.loads(l) for l in Path(tmp, "run", "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("split") != "val" and r["step"] > a.warmup]
    tps = statistics.median(r["tokens_per_sec"] for r in rows)
    res = {"config": a.config, "overrides": a.overrides, "steps_measured": len(rows), "trainer": head,
           "tokens_per_sec_median": tps,
           "mfu_median": statistics.median(r["mfu"] for r in rows) if "mfu" in rows[0] else None,
           "mem_gib_max": max(r["mem_gib"] for r in rows),
           "mem_reserved_gib_max": max(r.get("mem_reserved_gib", float("nan")) for r in rows)}
    if a.gemm_tflops and res["mfu_median"] is not None:
        # the trainer's MFU is against the card's datasheet peak (989 TFLOP/s bf16 for H100/H200
        # SXM; DLM_DATASHEET_TFLOPS for others); rescale it to the measured GEMM peak
        res["mfu_vs_gemm_median"] = res["mfu_median"] * float(os.environ.get("DLM_DATASHEET_TFLOPS", 989.0)) / a.gemm_tflops
    label = a.label or f"{a.config} {' '.join(a.overrides)}"
    mfu = f"{100 * res['mfu_median']:.1f}%" if res["mfu_median"] is not None else "n/a (no peak)"
    vs = f"{100 * res['mfu_vs_gemm_median']:.1f}%" if "mfu_vs_gemm_median" in res else "-"
    print("\n".join(head))
    print(f"| config | tokens/s (median) | MFU vs datasheet | MFU vs measured GEMM | peak alloc GiB | peak reserved GiB |\n|---|---|---|---|---|---|\n"
          f"| {label} | {tps:,.0f} | {mfu} | {vs} | {res['mem_gib_max']:.1f} | {res['mem_reserved_gib_max']:.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
