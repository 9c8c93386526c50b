"""bf16 training on every supported engine layout, on CPU (torch computes bf16 there too).

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/check_bf16.py OUT.json
For each layout: the first-step loss in fp32 and in bf16, the bf16 losses of 20 steps, the
dtypes seen in the first bf16 forward (parameters of the linear layers that compute, and
their outputs), the precision each engine really set up (megatron's TransformerConfig.bf16,
the dtype of the tensors AdamW updates and of its moments), and how the data-parallel
gradient reduction really ran: every reduction collective of the training steps is logged
with its size, dtype and whether it was launched while autograd's backward was running
(from a gradient hook: overlapped with the rest of backward) or after it (at the
accumulation boundary: exposed). Rank 0 writes {layout: {...}} for pytest to assert.

DeepSpeed reduces ZeRO-2/3 gradients in buckets of ``reduce_bucket_size`` elements (default
5e8), launched from the hooks as each bucket fills and the last one after backward; the tiny
model fits in one, so this check shrinks the bucket to 50k elements (about 20 buckets) to
see the hooks fire. The reductions are logged by wrapping torch.distributed's functions
before DeepSpeed and megatron-core bind them (megatron at import, DeepSpeed at init).
"""
import functools
import inspect
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import COMMON_OVERRIDES, REPO  # noqa: E402

BUCKET = 50_000


class ReductionLog:
    """Totals of the elements reduced over ranks while ``on``: launched inside backward or
    after it, per dtype. Tensors under 1024 elements (flags, norms, loss means) are left out:
    a gradient reduction of the tiny model is far larger."""

    NAMES = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
             "all_reduce_coalesced")
    INPUTS = ("tensor", "tensors", "input", "input_list")

    def __init__(self):
        self.on = False
        self.reset()

    def reset(self):
        self.in_backward, self.after_backward, self.dtypes = 0, 0, set()

    def install(self):
        import torch.distributed as dist

        for n in self.NAMES:
            if hasattr(dist, n):
                setattr(dist, n, self._wrap(getattr(dist, n)))

    def _wrap(self, fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def logged(*args, **kwargs):
            if self.on:
                self._record(sig.bind(*args, **kwargs).arguments)
            return fn(*args, **kwargs)

        return logged

    def _record(self, arguments):
        import torch

        x = next(arguments[k] for k in self.INPUTS if k in arguments)
        tensors = list(x) if isinstance(x, (list, tuple)) else [x]
        n = sum(t.numel() for t in tensors)
        if n < 1024:
            return
        self.dtypes.update(str(t.dtype) for t in tensors)
        if torch._C._current_graph_task_id() != -1:  # called from a hook of a running backward
            self.in_backward += n
        else:
            self.after_backward += n

    def summary(self):
        return {"in_backward": self.in_backward, "after_backward": self.after_backward, "dtypes": sorted(self.dtypes)}


REDUCTIONS = ReductionLog()

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

    import dlm_megatron.engine.deepspeed_engine as dse

    base_ds_config = dse.ds_config

    def small_buckets(*a, **k):
        conf = base_ds_config(*a, **k)
        conf["zero_optimization"]["reduce_bucket_size"] = BUCKET
        return conf

    dse.ds_config = small_buckets
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
        REDUCTIONS.on = True
        try:
            r = orig(step, mbl)
        finally:
            REDUCTIONS.on = False
        seen["done"] = True
        losses.append(tr.dp_mean(tr.pp_share(torch.stack([v.double() for v in r[0]]).mean().item())))
        return r

    tr.train_step = step_and_record
    REDUCTIONS.reset()
    try:
        tr.fit()
    finally:
        dse.ds_config = base_ds_config
    for h in hooks:
        h.remove()
    info = {k: sorted(v) for k, v in seen.items() if k != "done"}
    info.update(precision_setup(tr))
    info["reductions"] = REDUCTIONS.summary()
    sizes = [getattr(p, "ds_numel", p.numel()) for p in tr.model.parameters()]  # ZeRO-3: full size
    info["local_params"], info["largest_param"] = sum(sizes), max(sizes)
    return losses, info


def adam_tensors(opt) -> dict:
    """dtypes of what torch's AdamW (the innermost optimizer) really stepped: the tensors it
    holds state for are the master weights (ZeRO-3 puts its fp32 partitions into the param
    groups only during the step), next to their moments."""
    opts = list(getattr(opt, "chained_optimizers", [opt]))  # megatron: one per parameter group kind
    for i, o in enumerate(opts):
        while hasattr(o, "optimizer"):  # DeepSpeed / megatron wrappers around torch AdamW
            o = o.optimizer
        opts[i] = o
    states = [(p, st) for o in opts for p, st in o.state.items()]
    moments = [v for _, st in states for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"adam_params": sorted({str(p.dtype) for p, _ in states}), "adam_moments": sorted({str(m.dtype) for m in moments})}


def precision_setup(tr) -> dict:
    """Where each engine keeps master weights and accumulates / reduces gradients."""
    eng = tr.engine
    common = {"tcfg_bf16": bool(tr.model.config.bf16), **adam_tensors(eng.optimizer)}
    if hasattr(eng, "ddp"):  # megatron-core: DDP gradient buffers and the optimizer's main params
        opts = getattr(eng.optimizer, "chained_optimizers", [eng.optimizer])
        mains = [p for o in opts for g in (getattr(o, "shard_fp32_from_float16_groups", None) or
                                           getattr(o, "fp32_from_float16_groups", None) or []) for p in g]
        dc = eng.ddp.ddp_config
        return {**common, "optimizer": sorted({type(o).__name__ for o in opts}), "grad_buffers": sorted({str(b.grad_dtype) for b in eng.ddp.buffers}),
                "master": sorted({str(p.dtype) for p in mains}),
                "overlap": {"grad_reduce": dc.overlap_grad_reduce, "param_gather": dc.overlap_param_gather,
                            "forward_hooks": eng.ddp.use_forward_hook}}
    ds = eng.engine
    opt = ds.optimizer
    # Whether a bucket launched from a hook runs on its own stream (overlap_comm) or blocks the
    # backward stream: what ZeRO-1/2's optimizer was built with (DeepSpeed may override the
    # config), the config value for ZeRO-3 (passed through unchanged, not kept); BF16_Optimizer
    # and plain AdamW have no such setting.
    side_stream = getattr(opt, "overlap_comm", ds.zero_overlap_comm() if ds.zero_optimization_stage() == 3 else None)
    return {**common, "side_stream": side_stream, "optimizer": type(opt).__name__, "communication": str(ds.communication_data_type),
            "grad_accum": str(getattr(opt, "gradient_accumulation_dtype", ds.get_data_types()[1])),
            "autocast": bool(ds.torch_autocast_enabled()), "gas": ds.gradient_accumulation_steps(),
            "reduce_bucket_size": ds.zero_reduce_bucket_size()}


def main():
    out = sys.argv[1]
    REDUCTIONS.install()
    from dlm_megatron.parallel import dist as pdist
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    root = os.path.dirname(out)
    res = {}
    for name, layout in LAYOUTS.items():
        fp32, fp32_info = train(root, name, layout, "fp32", 1, record=False)
        bf16, dtypes = train(root, name, layout, "bf16", STEPS, record=True)
        res[name] = {"first_fp32": fp32[0], "losses_bf16": bf16, **dtypes,
                     "fp32": {k: fp32_info.get(k) for k in ("optimizer", "reductions", "side_stream")}}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    pdist.destroy()


if __name__ == "__main__":
    main()
