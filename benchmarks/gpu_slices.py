"""8B-shape slices on one GPU against the planner (tools/gpu_check.sh stage 3).

    python benchmarks/gpu_slices.py [--out FILE.json] [--layers 2 4] [--steps 3]
    python benchmarks/gpu_slices.py --dry-run     # CPU: configs, overrides and planner only

Trains configs/8b.yaml (masked, sdpa) and configs/8b_block.yaml (block diffusion, flex) cut to
a few layers, at full width, full vocabulary (126464), sequence 4096 and the preset's micro
batch, on one GPU (tp=1, local spec, builtin data) through the real trainer for a few steps,
and reads back peak allocated / reserved memory, what stays allocated between steps (weights,
gradients, optimizer states) and tokens/s (the two slices of a family run side by side unless
--sequential, so their tokens/s share the GPU). The per-layer memory is the
difference between two layer counts divided by the layer difference (what each extra layer
costs: its weights, gradients, optimizer states and saved activations); the planner is run
on exactly the same overrides and compared term for term with that difference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = 126464
SLICES = {
    "8b masked (sdpa)": ("configs/8b.yaml", ["model.attention_backend=sdpa"]),
    "8b block (flex)": ("configs/8b_block.yaml", ["model.attention_backend=flex"]),
}
COMMON = ["model.transformer_impl=local", "parallel.tp=1", "parallel.pp=1", "data.tokenizer=builtin",
          "data.train_path=builtin:shakespeare/train", "data.val_path=null", "logging.wandb=disabled",
          "logging.log_interval=1", "train.save_interval=0", "train.save_at_end=false", "train.eval_interval=0",
          "train.sample_at_end=false", "train.warmup_steps=1", "diffusion.random_length_prob=0.0"]


def overrides(config: str, extra: list[str], layers: int, steps: int) -> list[str]:
    from dlm_megatron.config import load_config

    micro = load_config(REPO / config).train.micro_batch_size
    return [*COMMON, *extra, f"model.num_layers={layers}", f"train.steps={steps}",
            f"train.global_batch_size={micro}", f"train.micro_batch_size={micro}"]


def planned(config: str, ovr: list[str]) -> dict:
    from dlm_megatron.config import load_config
    from dlm_megatron.planner import plan

    mem = plan(load_config(REPO / config, ovr), gpus=1, gpu_mem_gib=139.0, vocab_size=VOCAB, on_gpu=True)["memory"]
    mem["states"] = mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["zero_buffers"]
    return mem


def measure(config: str, ovr: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dlm_megatron.train", config, *ovr, f"train.output_dir={tmp}/run"]
        p = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200], "log": p.stdout[-1500:] + p.stderr[-3000:]}
        rows = [json.loads(l) for l in Path(tmp, "run", "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("split") != "val"]
    return {"alloc_gib": max(r["mem_gib"] for r in rows), "reserved_gib": max(r.get("mem_reserved_gib", float("nan")) for r in rows),
            "states_gib": rows[-1].get("mem_now_gib", float("nan")),
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows[1:] or rows),
            "loss": rows[-1]["loss"], "trainer": [l for l in p.stdout.splitlines() if l.startswith(("model:", "note:"))]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4], metavar=("A", "B"), help="the two layer counts")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per slice")
    ap.add_argument("--only", choices=sorted(SLICES), default=None, help="run one slice family")
    ap.add_argument("--sequential", action="store_true",
                    help="run the two slices of a family one after the other (tokens/s undisturbed; slower)")
    ap.add_argument("--dry-run", action="store_true", help="check configs/overrides and run the planner only (CPU)")
    a = ap.parse_args(argv)
    lo, hi = a.layers
    if not 0 < lo < hi:
        ap.error("--layers A B needs 0 < A < B")
    GiB = 2 ** 30
    results, lines = {}, ["| slice | layers | peak alloc GiB | peak reserved GiB | between steps GiB | tokens/s | planned peak GiB |",
                          "|---|---|---|---|---|---|---|"]
    summary = ["| slice | measured per layer GiB | planned per layer GiB | planned / measured | states measured | states planned "
               "| working set measured | working set planned |", "|---|---|---|---|---|---|---|---|"]
    for name, (config, extra) in SLICES.items():
        if a.only and name != a.only:
            continue
        res = {}
        ovrs = {n: overrides(config, extra, n, a.steps) for n in (lo, hi)}
        # The two slices of a family run side by side (memory figures are per process; the
        # GPU has room for both), which keeps the stage inside gpu_check.sh's time budget.
        with ThreadPoolExecutor(max_workers=1 if a.sequential else 2) as pool:
            runs = {n: pool.submit(measure, config, ovrs[n]) for n in (lo, hi)} if not a.dry_run else {}
        for n in (lo, hi):
            plan_mem = planned(config, ovrs[n])
            m = {"planned_peak_gib": plan_mem["modeled_peak"] / GiB, "planned_states_gib": plan_mem["states"] / GiB}
            if not a.dry_run:
                m.update(runs[n].result())
            res[n] = m
            if "error" in m:
                lines.append(f"| {name} | {n} | error: {m['error']} | | | {m['planned_peak_gib']:.1f} |")
                print(m["log"], file=sys.stderr)
            elif not a.dry_run:
                lines.append(f"| {name} | {n} | {m['alloc_gib']:.2f} | {m['reserved_gib']:.2f} | {m['states_gib']:.2f} | "
                             f"{m['tokens_per_sec']:,.0f} | {m['planned_peak_gib']:.2f} |")
            print(lines[-1] if not a.dry_run else f"{name} {n} layers: planned peak {m['planned_peak_gib']:.2f} GiB", flush=True)
        planned_pl = (res[hi]["planned_peak_gib"] - res[lo]["planned_peak_gib"]) / (hi - lo)
        if not a.dry_run and "alloc_gib" in res[lo] and "alloc_gib" in res[hi]:
            measured_pl = (res[hi]["alloc_gib"] - res[lo]["alloc_gib"]) / (hi - lo)
            states_pl = (res[hi]["states_gib"] - res[lo]["states_gib"]) / (hi - lo)
            pstates_pl = (res[hi]["planned_states_gib"] - res[lo]["planned_states_gib"]) / (hi - lo)
            summary.append(f"| {name} | {measured_pl:.3f} | {planned_pl:.3f} | {planned_pl / measured_pl:.3f} | "
                           f"{states_pl:.3f} | {pstates_pl:.3f} | {measured_pl - states_pl:.3f} | {planned_pl - pstates_pl:.3f} |")
            res["per_layer"] = {"measured_gib": measured_pl, "planned_gib": planned_pl, "measured_states_gib": states_pl,
                                "planned_states_gib": pstates_pl}
        results[name] = res
    if a.dry_run:
        print("gpu_slices dry run: configs, overrides and planner OK")
        return 0
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(summary))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
