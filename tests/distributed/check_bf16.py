"""bf16 training on every supported engine layout, on CPU (torch computes bf16 there too).

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/check_bf16.py OUT.json
For each layout: the first-step loss in fp32 and in bf16, the bf16 losses of 20 steps, and
the dtypes seen in the first bf16 forward (parameters of the linear layers that compute, and
their outputs). Rank 0 writes {layout: {...}} for pytest to assert.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO  # noqa: E402

# DeepSpeed's torch_autocast (ZeRO-0's bf16) sets process-global state, so it runs last.
LAYOUTS = {
    "deepspeed_zero1_dp2": "parallel.zero_stage=1",
    "deepspeed_zero2_dp2": "parallel.zero_stage=2",
    "deepspeed_zero3_dp2": "parallel.zero_stage=3",
    "megatron_pp2": "parallel.pp=2,parallel.zero_stage=1",
    "megatron_dp2": "parallel.engine=megatron,parallel.zero_stage=1",
    "deepspeed_zero0_dp2": "parallel.zero_stage=0",
}
STEPS = 20


def train(out_root, name, layout, precision, steps, record):
    import torch

    from dlm_megatron.config import load_config
    from dlm_megatron.train import Trainer

    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), list(COMMON_OVERRIDES) + [kv for kv in layout.split(",") if kv] + [
        f"train.precision={precision}", f"train.steps={steps}", "train.save_at_end=false", "train.lr=3e-3",
        f"train.output_dir={out_root}/{name}_{precision}"])
    tr = Trainer(cfg)
    seen = {"params": set(), "outputs": set()}
    hooks = []

    def hook(mod, args, out):
        if record and not seen.get("done"):
            seen["params"].update(str(p.dtype) for p in mod.parameters(recurse=False))
            seen["outputs"].add(str((out[0] if isinstance(out, tuple) else out).dtype))

    for m in tr.model.modules():
        if type(m).__name__.endswith("ParallelLinear"):
            hooks.append(m.register_forward_hook(hook))
    losses = []
    orig = tr.train_step

    def step_and_record(step, mbl=None):
        r = orig(step, mbl)
        seen["done"] = True
        losses.append(tr.dp_mean(tr.pp_share(torch.stack([v.double() for v in r[0]]).mean().item())))
        return r

    tr.train_step = step_and_record
    tr.fit()
    for h in hooks:
        h.remove()
    info = {k: sorted(v) for k, v in seen.items() if k != "done"}
    info.update(precision_setup(tr))
    return losses, info


def precision_setup(tr) -> dict:
    """Where each engine keeps master weights and accumulates / reduces gradients."""
    eng = tr.engine
    if hasattr(eng, "ddp"):  # megatron-core: DDP gradient buffers and the optimizer's main params
        opts = getattr(eng.optimizer, "chained_optimizers", [eng.optimizer])
        mains = [p for o in opts for g in (getattr(o, "shard_fp32_from_float16_groups", None) or
                                           getattr(o, "fp32_from_float16_groups", None) or []) for p in g]
        dc = eng.ddp.ddp_config
        return {"optimizer": sorted({type(o).__name__ for o in opts}), "grad_buffers": sorted({str(b.grad_dtype) for b in eng.ddp.buffers}),
                "master": sorted({str(p.dtype) for p in mains}),
                "overlap": {"grad_reduce": dc.overlap_grad_reduce, "param_gather": dc.overlap_param_gather,
                            "forward_hooks": eng.ddp.use_forward_hook}}
    ds = eng.engine
    opt = ds.optimizer
    return {"optimizer": type(opt).__name__, "communication": str(ds.communication_data_type),
            "grad_accum": str(getattr(opt, "gradient_accumulation_dtype", ds.get_data_types()[1])),
            "autocast": bool(ds.torch_autocast_enabled()), "overlap_comm": bool(ds.zero_overlap_comm())}


def main():
    out = sys.argv[1]
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    root = os.path.dirname(out)
    res = {}
    for name, layout in LAYOUTS.items():
        fp32, _ = train(root, name, layout, "fp32", 1, record=False)
        bf16, dtypes = train(root, name, layout, "bf16", STEPS, record=True)
        res[name] = {"first_fp32": fp32[0], "losses_bf16": bf16, **dtypes}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    pdist.destroy()


if __name__ == "__main__":
    main()
