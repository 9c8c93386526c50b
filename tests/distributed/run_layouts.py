"""Run several training layouts inside ONE torchrun launch (a launch costs 5-14 s here).

usage: torchrun --standalone --nproc_per_node=N tests/distributed/run_layouts.py OUT_ROOT NAME:k=v,k=v [NAME:...]

Each NAME trains configs/tiny.yaml shrunk by the common overrides below plus its own, with
its run directory at OUT_ROOT/NAME. The pytest side compares metrics.jsonl and checkpoints.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO  # noqa: E402

from dlm_megatron.config import load_config  # noqa: E402
from dlm_megatron.train import run  # noqa: E402


def main():
    out_root = sys.argv[1]
    for spec in sys.argv[2:]:
        name, _, kvs = spec.partition(":")
        overrides = list(COMMON_OVERRIDES) + [kv for kv in kvs.split(",") if kv] + [f"train.output_dir={out_root}/{name}"]
        cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), overrides)
        run(cfg)


if __name__ == "__main__":
    main()
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()
