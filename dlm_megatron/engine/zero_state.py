"""The project's own optimizer-state format, resumable at any DP size: DeepSpeed ZeRO 0-3
here, and the megatron engine (engine/megatron_state.py maps megatron-core's optimizers to
the same fragments; the staging, reader and loader below serve both).

DeepSpeed's own checkpoints store each rank's flat partition of the optimizer state, so
they only load at the DP size (and ZeRO layout) that wrote them; its universal-checkpoint
conversion is an offline pass over every file. Here each rank writes, per parameter, the
fragment of Adam's state it owns, under the parameter's canonical name (the same names as
the model shards) and the fragment's offset in the flattened (TP-local) parameter:

    optim/tp{T}_pp{P}_dp{D}.safetensors
        "{canonical name}|exp_avg|{start}", "...|exp_avg_sq|{start}"   fp32, 1-D
        "...|master|{start}"   fp32 master weights (bf16 runs: the model shard holds bf16)
        metadata: {"format": FORMAT, "adam_step": N}

ZeRO-1/2 (and BF16_Optimizer) fragments are the ranges DeepSpeed maps to this rank's flat
partition (``param._hp_mapping``); ZeRO-3's are each parameter's partition; ZeRO-0's are
whole parameters, written by DP rank 0 only (every DP rank holds the same state). Nothing
is communicated: staging is a device-to-host copy of what a rank already holds.

On load at any DP size, each rank reads, for each parameter, exactly the range its new
partition covers (safetensors slices of the overlapping fragments; no other rank's bytes),
creates Adam's state tensors if the optimizer has not stepped yet, and copies the ranges
in. The model weights come from the model shards before the engine is built (ZeRO
partitions what it is given); the fp32 masters of bf16 runs come from here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import ZERO_STATE_FORMAT as FORMAT
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _ranges(opt, stage: int, p) -> tuple[int, int] | None:
    """(start, length) of the flattened parameter ``p`` whose optimizer state this rank holds."""
    if stage == 0:
        return 0, p.numel()
    if stage == 3:
        group, offset, pn = opt.grad_position[opt.get_param_id(p)]
        start = opt._get_param_partition_rank(p) * pn
        return (start, min(pn, p.ds_numel - start)) if start < p.ds_numel else None
    m = getattr(p, "_hp_mapping", None)
    return None if m is None else (m.lp_fragment_address.start, m.lp_fragment_address.numel)


def _views(opt, stage: int, p, length: int) -> dict[str, torch.Tensor]:
    """Live 1-D views of this rank's state for ``p``: exp_avg, exp_avg_sq and master."""
    if stage == 0:
        st = opt.state[p]
        return {"exp_avg": st["exp_avg"].view(-1), "exp_avg_sq": st["exp_avg_sq"].view(-1), "master": p.data.view(-1)}
    if stage == 3:
        group, offset, _ = opt.grad_position[opt.get_param_id(p)]
        flat = opt.fp32_partitioned_groups_flat[group]
        st = opt.optimizer.state[flat]
        return {"exp_avg": st["exp_avg"].narrow(0, offset, length), "exp_avg_sq": st["exp_avg_sq"].narrow(0, offset, length),
                "master": flat.narrow(0, offset, length)}
    m = p._hp_mapping
    return {"exp_avg": m.get_optim_state_fragment("exp_avg"), "exp_avg_sq": m.get_optim_state_fragment("exp_avg_sq"),
            "master": m.get_hp_fragment()}


def _relink(opt, stage: int) -> None:
    """(Re)map every parameter's fragment to the optimizer state as it exists now. DeepSpeed
    links them once, right after the first param group's first step, when the other groups
    have no state yet: their fragments would stay empty (ZeRO-1/2, BF16_Optimizer)."""
    if stage in (1, 2):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def base_optimizer(opt, stage: int) -> torch.optim.Optimizer:
    return opt if stage == 0 else opt.optimizer


def adam_step(opt, stage: int) -> float:
    for st in base_optimizer(opt, stage).state.values():
        if "step" in st:
            return float(st["step"])
    return 0.0


def _fragments(opt, stage: int, named: list):
    """(name, start, live 1-D views) of every non-empty fragment this rank holds."""
    for name, p in named:
        r = _ranges(opt, stage, p)
        if r is not None and r[1] > 0:
            yield name, r[0], _views(opt, stage, p, r[1])


def stage_views(fragments, staging, keys: tuple) -> dict[str, torch.Tensor]:
    """``fragments`` ((name, start, {key: live 1-D view})) copied into ``staging``
    (saving.HostStaging) as {"name|key|start": 1-D fp32}: the file's tensors. Engine-free,
    shared by the DeepSpeed and megatron engines."""
    out = {}
    for name, start, views in fragments:
        for key in keys:
            k = f"{name}|{key}|{start}"
            out[k] = staging.copy(f"optim/{k}", views[key].reshape(-1), torch.float32)
    return out


def stage_fragments(opt, stage: int, named: list, staging, *, with_master: bool) -> dict[str, torch.Tensor]:
    """This rank's fragments copied into ``staging`` (saving.HostStaging), as
    {"name|key|start": 1-D fp32}; empty before the optimizer's first step (no state yet)."""
    if adam_step(opt, stage) == 0:
        return {}
    _relink(opt, stage)
    return stage_views(_fragments(opt, stage, named), staging, STATE_KEYS + (("master",) if with_master else ()))


class FragmentReader:
    """The fragments of one (TP, PP) rank's files, from any DP size: ``read(name, key, start,
    length)`` assembles a range from the fragments that overlap it, reading only those
    slices (``bytes_read`` counts them; ``total_bytes`` is the state of this (TP, PP) rank
    over every DP rank)."""

    def __init__(self, directory: Path, tp_rank: int, pp_rank: int):
        from safetensors import safe_open

        from ..checkpoint import CheckpointError

        self.bytes_read, self.total_bytes, self.adam_step = 0, 0, None
        self._index: dict[tuple[str, str], list[tuple[int, int, object, str]]] = {}
        files = sorted(directory.glob(f"tp{tp_rank}_pp{pp_rank}_dp*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory} holds no optimizer state for tp{tp_rank}_pp{pp_rank} "
                                  f"(the checkpoint was written with another TP/PP layout)")
        for f in files:
            try:
                fh = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises several types on corrupt files
                raise CheckpointError(f"optimizer state {f} is corrupt ({type(e).__name__}); restore it or use an older checkpoint") from None
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{f} is not {FORMAT} optimizer state (format {meta.get('format')})")
            self.adam_step = float(meta["adam_step"])
            for key in fh.keys():
                name, what, start = key.rsplit("|", 2)
                n = fh.get_slice(key).get_shape()[0]
                self.total_bytes += 4 * n
                self._index.setdefault((name, what), []).append((int(start), n, fh, key))

    def has(self, name: str, key: str) -> bool:
        return (name, key) in self._index

    def read(self, name: str, key: str, start: int, length: int) -> torch.Tensor:
        from ..checkpoint import CheckpointError

        out = torch.empty(length, dtype=torch.float32)
        covered = 0
        for f_start, n, fh, tkey in self._index.get((name, key), ()):
            a, b = max(start, f_start), min(start + length, f_start + n)
            if a < b:
                out[a - start: b - start] = fh.get_slice(tkey)[a - f_start: b - f_start]
                self.bytes_read += (b - a) * 4
                covered += b - a
        if covered != length:
            raise CheckpointError(f"optimizer state for {name} ({key}) covers {covered} of the {length} values "
                                  f"[{start}, {start + length}) this rank needs; the checkpoint is incomplete")
        return out


def load_fragments(opt, stage: int, named: list, reader: FragmentReader) -> None:
    """Fill this rank's optimizer state (at any DP size) from ``reader``: Adam's moments,
    its step count, and the fp32 masters where the checkpoint has them. A checkpoint saved
    before the first optimizer step holds no state: the optimizer stays fresh."""
    if not reader.adam_step:
        return
    base = base_optimizer(opt, stage)
    step = torch.tensor(reader.adam_step, dtype=torch.float32)
    # the tensors Adam steps: ZeRO-3 puts each sub-group's flat partition into its param
    # group only for the duration of step(); the others keep them there
    flats = opt.fp32_partitioned_groups_flat if stage == 3 else [fp for g in base.param_groups for fp in g["params"]]
    for fp in flats:
        st = base.state[fp]
        if "exp_avg" not in st:  # never stepped: create what AdamW's first step would
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(fp), torch.zeros_like(fp)
        st["step"] = step.clone()
    _relink(opt, stage)  # map each parameter's fragment to the state just created
    fill_views(_fragments(opt, stage, named), reader)


@torch.no_grad()
def fill_views(fragments, reader: FragmentReader) -> None:
    """Copy into each of ``fragments`` ((name, start, {key: live 1-D view})) the range it
    covers: Adam's moments, and the fp32 master where the checkpoint has one."""
    for name, start, views in fragments:
        for key in STATE_KEYS + (("master",) if reader.has(name, "master") else ()):
            v = views[key]
            v.copy_(reader.read(name, key, start, v.numel()).to(v.dtype))
