"""Rank-0 metrics logging with pluggable sinks: stdout line, metrics.jsonl, W&B.

One structured line per logged step (step, loss, lr, grad norm, tokens/s, MFU, memory);
the same dict goes to ``metrics.jsonl`` and, when enabled, Weights & Biases (offline by
default: files under ``<output_dir>/wandb``, sync later with ``wandb sync``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path


def quiet_warnings() -> None:
    """megatron-core warns at import that TE/apex are absent; that is expected on CPU."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")


def fmt_line(row: dict) -> str:
    parts = []
    if row.get("split") == "val":
        parts.append(f"[val] step {row['step']}")
        for k in ("loss", "ppl_bound"):
            if k in row:
                parts.append(f"{k} {row[k]:.4f}")
        return " | ".join(parts)
    parts.append(f"step {row['step']:>6}")
    parts.append(f"loss {row['loss']:.4f}")
    parts.append(f"lr {row['lr']:.3e}")
    parts.append(f"grad_norm {row['grad_norm']:.3f}")
    parts.append(f"tok/s {row['tokens_per_sec']:,.0f}")
    if "mfu" in row:
        parts.append(f"mfu {100 * row['mfu']:.2f}%")
    if "mem_gib" in row:
        parts.append(f"mem {row['mem_gib']:.2f}GiB")
    if "moe_aux_loss" in row:
        parts.append(f"moe aux {row['moe_aux_loss']:.3f}")
    if "moe_max_load" in row:
        parts.append(f"max load {row['moe_max_load']:.2f}x")
    return " | ".join(parts)


class JsonlSink:
    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def log(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self.f.close()


class StdoutSink:
    def log(self, row: dict) -> None:
        print(fmt_line(row), flush=True)

    def close(self) -> None:
        pass


class WandbSink:
    """W&B run; the run id is kept in the output dir so a resumed job continues the same run."""

    def __init__(self, cfg, output_dir: Path, config_dict: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        id_file = output_dir / "wandb_run_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            import secrets
            import string

            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.logging.wandb_run_name or output_dir.name,
            id=run_id,
            resume="allow",
            mode=cfg.logging.wandb,
            dir=str(output_dir),
            config=config_dict,
        )

    def log(self, row: dict) -> None:
        prefix = "val/" if row.get("split") == "val" else "train/"
        data = {prefix + k: v for k, v in row.items() if k not in ("step", "split") and isinstance(v, (int, float))}
        self.run.log(data, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    def __init__(self, cfg, output_dir: Path, *, is_rank0: bool, config_dict: dict):
        self.sinks = []
        if not is_rank0:
            return
        self.sinks = [StdoutSink(), JsonlSink(output_dir / "metrics.jsonl")]
        if cfg.logging.wandb != "disabled":
            try:
                self.sinks.append(WandbSink(cfg, output_dir, config_dict))
            except Exception as e:  # W&B must never take down a training run
                print(f"warning: W&B logging disabled ({type(e).__name__}: {e})", file=sys.stderr)

    def log(self, row: dict) -> None:
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
