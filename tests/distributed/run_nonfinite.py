"""Non-finite steps under every engine, in ONE torchrun launch (tests/distributed/test_nonfinite.py).

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/run_nonfinite.py OUT_ROOT NAME:LOSS_STEPS:GRAD_STEPS:LAST_RANK_STEPS:k=v,k=v [...]

Each NAME trains configs/tiny.yaml shrunk by the common overrides plus its own, poisoning the
loss on every rank at LOSS_STEPS, only the gradient at GRAD_STEPS, and only the last
data-parallel rank's loss value at LAST_RANK_STEPS (comma lists, '-' for none; the
DLM_TEST_INJECT_NAN_* hooks of dlm_megatron.train, engine/poison.py). A run that stops with TrainingDiverged
records its message in OUT_ROOT/NAME/stopped.txt (rank 0).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO  # noqa: E402

from dlm_megatron.config import load_config  # noqa: E402
from dlm_megatron.train import TrainingDiverged, run  # noqa: E402


def main():
    out_root = sys.argv[1]
    for spec in sys.argv[2:]:
        name, loss_steps, grad_steps, last_rank_steps, kvs = spec.split(":", 4)
        for var, steps in (("DLM_TEST_INJECT_NAN_STEPS", loss_steps), ("DLM_TEST_INJECT_NAN_GRAD_STEPS", grad_steps),
                           ("DLM_TEST_INJECT_NAN_LAST_RANK_STEPS", last_rank_steps)):
            os.environ[var] = "" if steps == "-" else steps
        overrides = list(COMMON_OVERRIDES) + [kv for kv in kvs.split(",") if kv] + [f"train.output_dir={out_root}/{name}"]
        cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), overrides)
        try:
            run(cfg)
        except TrainingDiverged as e:
            if int(os.environ.get("RANK", "0")) == 0:
                with open(os.path.join(out_root, name, "stopped.txt"), "w") as f:
                    f.write(str(e))


if __name__ == "__main__":
    main()
    from dlm_megatron.parallel import dist as pdist

    pdist.destroy()
