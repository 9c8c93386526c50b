"""Hooks a run in tests/distributed/run_layouts.py can be given (``@hook=NAME``): each is a
context manager patching the megatron engine's save for the duration of that run.

- ``copy_only``: every collective of torch.distributed raises while ``stage_state`` runs (a
  save must be a copy of what the rank holds); each call that got through is counted in
  ``OUT/copy_only_saves.txt``.
- ``legacy``: saves in megatron-core's own format as the engine wrote it before the project's
  (``engine/optim_tp{T}_pp{P}.pt``: the optimizer state gathered to DP rank 0, and
  ``engine/common_tp{T}_pp{P}.pt``; meta.json ``optimizer`` null): checkpoints of that
  format exist on users' disks and must still resume.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "_all_gather_base", "gather",
               "gather_object", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "_reduce_scatter_base", "all_to_all", "all_to_all_single", "scatter", "scatter_object_list", "barrier",
               "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv")


@contextmanager
def collectives_forbidden():
    """Every collective above, in torch.distributed and in distributed_c10d (where megatron's
    and torch's own callers look them up), raises AssertionError naming itself."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called while staging a save")
        return call

    saved = [(m, n, getattr(m, n)) for m in (dist, c10d) for n in COLLECTIVES if hasattr(m, n)]
    for m, n, _ in saved:
        setattr(m, n, forbidden(n))
    try:
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


@contextmanager
def copy_only(out_dir: str):
    from dlm_megatron.engine.megatron_engine import MegatronEngine

    real = MegatronEngine.stage_state

    def stage_state(self, *args, **kwargs):
        with collectives_forbidden():
            files = real(self, *args, **kwargs)
        with (Path(out_dir) / "copy_only_saves.txt").open("a") as f:
            f.write(f"{sum(len(sf.tensors or {}) for sf in files)}\n")  # tensors this rank staged
        return files

    MegatronEngine.stage_state = stage_state
    try:
        yield
    finally:
        MegatronEngine.stage_state = real


def _legacy_stage_state(self, named, staging, *, tp_rank, pp_rank, dp_rank):
    """The megatron engine's stage_state before the project's format (commit 337eb35)."""
    from megatron.core import parallel_state as ps

    from dlm_megatron.saving import StagedFile, host_tree

    optim_name, common_name = self._names()
    files = []
    if self.cfg.parallel.zero_stage == 1:
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        states, mine = [], False
        for o in opts:
            if hasattr(o, "get_parameter_state_dp_zero"):
                st = o.get_parameter_state_dp_zero()
                first = o.data_parallel_group.rank() == 0
                states.append(st if first else None)
                mine = mine or first
        if mine:
            files.append(StagedFile(f"engine/{optim_name}", obj=states[0] if len(opts) == 1 else states))
    if ps.get_data_parallel_rank() == 0 or (ps.get_expert_model_parallel_rank() > 0 and ps.get_expert_data_parallel_rank() == 0):
        from dlm_megatron.engine import megatron_state

        files.append(StagedFile(f"engine/{common_name}", obj=host_tree(
            {"optimizer": self.optimizer.state_dict(), "client": {}, "adam_step": megatron_state.adam_step(self.optimizer)})))
    return files


@contextmanager
def legacy(out_dir: str):
    from dlm_megatron.engine.megatron_engine import MegatronEngine

    real, fmt = MegatronEngine.stage_state, MegatronEngine.state_format
    MegatronEngine.stage_state, MegatronEngine.state_format = _legacy_stage_state, None
    try:
        yield
    finally:
        MegatronEngine.stage_state, MegatronEngine.state_format = real, fmt
