"""The megatron engine's optimizer state in the project's own format (zero_state.py).

Each rank copies, per parameter, the fragment of Adam's state it steps into reused host
buffers, under the parameter's canonical name and the fragment's offset in the flattened
(TP-local) parameter: the same files, keys and reader as the DeepSpeed engine's. Nothing is
communicated, so a save costs a host copy of what the rank already holds.

Where the fragments come from (megatron-core's optimizers, possibly chained: with MoE the
dense parameters' optimizer is sharded over the DP group and the experts' over the
expert-data-parallel group):

- ``DistributedOptimizer`` (parallel.zero_stage=1): its range map gives, for each parameter
  this rank owns a piece of, ``gbuf_ranges[i][dtype][bucket]["param_map"][p]["param"]``, the
  piece's range in the flattened parameter; the fp32 shard main parameter stepped for it is
  ``optimizer.param_groups[g]["params"][k]`` with ``(g, k) = model_param_group_index_map[p]``,
  and its moments are the inner optimizer's state of that tensor.
- ``Float16OptimizerWithFloat16Params`` / ``FP32Optimizer`` (zero_stage=0): whole parameters
  (fp32 copies of bf16 ones, or the parameters themselves). Every replica holds the same
  state, so the engine has one rank per replica set write them.

Experts' canonical names carry the global expert index, so a file's content does not depend
on the EP or DP layout that wrote it; on load any layout with the same TP and PP finds the
ranges it needs in the (TP, PP) rank's files.
"""
from __future__ import annotations

import torch


def optimizers(optimizer) -> list:
    """megatron-core's optimizers behind ``optimizer``: the chained ones (MoE: dense and
    expert), or itself."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _main_params(o):
    """(model parameter, offset of this rank's fragment in it, the fp32 1-D tensor stepped for
    that fragment) for every parameter megatron optimizer ``o`` steps on this rank."""
    if hasattr(o, "model_param_gbuf_map"):  # DistributedOptimizer: this rank's shard ranges
        for p, (gbuf, dtype, bucket) in o.model_param_gbuf_map.items():
            start = o.gbuf_ranges[gbuf][dtype][bucket]["param_map"][p]["param"].start
            g, k = o.model_param_group_index_map[p]
            yield p, start, o.optimizer.param_groups[g]["params"][k]
    elif hasattr(o, "float16_groups"):  # bf16 weights with fp32 main copies (fp32 ones step themselves)
        for model_group, main_group in zip(o.float16_groups, o.fp32_from_float16_groups):
            yield from ((p, 0, m) for p, m in zip(model_group, main_group))
        yield from ((p, 0, p) for group in o.fp32_from_fp32_groups for p in group)
    else:  # FP32Optimizer: the parameters are their own masters
        yield from ((p, 0, p) for group in o.optimizer.param_groups for p in group["params"])


def owned(optimizer) -> dict[int, tuple[int, torch.Tensor, torch.optim.Optimizer]]:
    """id(model parameter) -> (fragment offset, fp32 main tensor, the torch optimizer holding
    its Adam state), over every (chained) optimizer; parameters this rank steps no part of
    are absent."""
    return {id(p): (start, main, o.optimizer) for o in optimizers(optimizer) for p, start, main in _main_params(o)}


def fragments(optimizer, named: list):
    """(canonical name, start, {exp_avg, exp_avg_sq, master: live 1-D views}) of every
    fragment this rank steps; buffers and parameters it holds no state for are skipped."""
    mine = owned(optimizer)
    for name, p in named:
        if id(p) in mine:
            start, main, inner = mine[id(p)]
            st = inner.state[main]
            yield name, start, {"exp_avg": st["exp_avg"].view(-1), "exp_avg_sq": st["exp_avg_sq"].view(-1),
                                "master": main.detach().view(-1)}


def _torch_adam(inner) -> bool:
    """torch's Adam/AdamW count steps per state tensor; the fused ones (TE, apex) per group."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def adam_step(optimizer) -> float:
    """Adam's bias-correction step count (the same for every parameter; 0 before the first step)."""
    for o in optimizers(optimizer):
        for st in o.optimizer.state.values():
            if "step" in st:
                return float(st["step"])
        if not _torch_adam(o.optimizer):
            for g in o.optimizer.param_groups:
                if g.get("step"):
                    return float(g["step"])
    return 0.0


def ensure_state(optimizer, step: float) -> None:
    """Adam's state for every tensor this rank steps, as after ``step`` steps: created
    (zeros) where the optimizer has not stepped yet, the step count set everywhere."""
    for start, main, inner in owned(optimizer).values():
        st = inner.state[main]
        if "exp_avg" not in st:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(main), torch.zeros_like(main)
        if _torch_adam(inner):
            st["step"] = torch.tensor(step, dtype=torch.float32)
    for o in optimizers(optimizer):
        if not _torch_adam(o.optimizer):
            for g in o.optimizer.param_groups:
                g["step"] = int(step)
