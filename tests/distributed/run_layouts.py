"""Run several training layouts inside ONE torchrun launch (a launch costs 5-14 s here).

usage: torchrun --standalone --nproc_per_node=N tests/distributed/run_layouts.py OUT_ROOT NAME:k=v,k=v [NAME:...]
(an item "@stop=N" stops that run after step N as if preempted; a later launch resumes it;
"@hook=NAME" runs it inside tests/distributed/save_hooks.py's NAME(run directory))

Each NAME trains configs/tiny.yaml shrunk by the common overrides below plus its own, with
its run directory at OUT_ROOT/NAME. The pytest side compares metrics.jsonl and checkpoints.
"""
import contextlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import save_hooks  # noqa: E402
from common import COMMON_OVERRIDES, REPO  # noqa: E402

from dlm_megatron.config import load_config  # noqa: E402
from dlm_megatron.train import Preempted, run  # noqa: E402


def main():
    out_root = sys.argv[1]
    for spec in sys.argv[2:]:
        name, _, kvs = spec.partition(":")
        items = [kv for kv in kvs.split(",") if kv]
        # "@stop=N": behave as if preempted after step N (checkpoint, then stop).
        stop = [kv.split("=")[1] for kv in items if kv.startswith("@stop=")]
        os.environ["DLM_TEST_STOP_AT_STEP"] = stop[0] if stop else "-1"
        overrides = list(COMMON_OVERRIDES) + [kv for kv in items if not kv.startswith("@")] + [f"train.output_dir={out_root}/{name}"]
        cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), overrides)
        hooks = [getattr(save_hooks, kv.split("=")[1])(f"{out_root}/{name}") for kv in items if kv.startswith("@hook=")]
        with contextlib.ExitStack() as stack:
            for h in hooks:
                stack.enter_context(h)
            try:
                run(cfg)
            except Preempted:
                pass


if __name__ == "__main__":
    main()
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()
