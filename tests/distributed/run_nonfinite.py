"""Non-finite steps under every engine, in ONE torchrun launch (tests/distributed/test_nonfinite.py).

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/run_nonfinite.py OUT_ROOT NAME:LOSS_STEPS:GRAD_STEPS:k=v,k=v [...]

Each NAME trains configs/tiny.yaml shrunk by the common overrides plus its own, poisoning the
loss at LOSS_STEPS and only the gradient at GRAD_STEPS (comma lists, '-' for none; the
DLM_TEST_INJECT_NAN_* hooks of dlm_megatron.train). A run that stops with TrainingDiverged
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
        name, loss_steps, grad_steps, kvs = spec.split(":", 3)
        os.environ["DLM_TEST_INJECT_NAN_STEPS"] = "" if loss_steps == "-" else loss_steps
        os.environ["DLM_TEST_INJECT_NAN_GRAD_STEPS"] = "" if grad_steps == "-" else grad_steps
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
