"""Rewrite a checkpoint's model shards for another tensor/pipeline-parallel layout, offline.

The shards use canonical names (global layer indices, full-model names), so any layout (and
world size) can be read as the target layout's slices: ``checkpoint.ShardReader`` cuts each
target shard's tensors straight out of the source shards (safetensors slices), so memory
holds one target shard at a time, never the merged model; the split follows
``model.sharding.shard``:

- pipeline stage p holds layers [p*L/pp, (p+1)*L/pp); the embedding lives on the first
  stage, the final norm and output head on the last; other top-level parameters stay on the
  stage(s) that held them in the source (first and/or last);
- tied embeddings: only ``embedding.word_embeddings.weight`` is stored; with pp > 1 the last
  stage's copy for the output head (megatron's ``output_layer.weight``) loads from it;
- tensor-parallel splits follow ``sharding.partition_dim`` (SwiGLU's [gate; up] per rank).

The output is a run directory (``checkpoints/step_XXXXXX`` + ``latest`` + ``config.yaml``)
whose checkpoint has ``engine: null``: weights only. The trainer starts a fresh optimizer
(Adam moments restart from zero) at the checkpoint's step: resume with
``train.output_dir=OUTPUT parallel.tp=N parallel.pp=M`` or start a new run with
``train.init_from=OUTPUT``.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import ConvertError, check_output_dir, prepare_output_dir, progress_bar

_FIRST, _LAST = "first", "last"


def stage_of(name: str, num_layers: int, pp: int, placement: dict[str, set[str]] | None = None) -> list[int]:
    """Pipeline stages that hold a canonical parameter."""
    from ..model.sharding import layer_index

    i = layer_index(name)
    if i is not None:
        if not 0 <= i < num_layers:
            raise ConvertError(f"parameter '{name}' has layer index {i}, but the model has {num_layers} layers")
        return [i // (num_layers // pp)]
    if name.startswith("embedding."):
        return [0]
    if name.startswith(("decoder.final_layernorm.", "output_layer.")):
        return [pp - 1]
    where = (placement or {}).get(name)
    if where is None:
        if pp == 1:
            return [0]
        raise ConvertError(f"cannot tell which pipeline stage holds '{name}' (the source had one stage); reshard with --pp 1")
    return sorted({0 if w == _FIRST else pp - 1 for w in where})


def source_placement(ckpt: Path, meta: dict) -> dict[str, set[str]]:
    """For each top-level parameter of a PP > 1 source: on its first and/or last stage."""
    from ..checkpoint import shard_filename
    from ..model.sharding import layer_index

    pp = meta["layout"]["pp"]
    out: dict[str, set[str]] = {}
    if pp == 1:
        return out
    for p, tag in ((0, _FIRST), (pp - 1, _LAST)):
        with safe_open(str(ckpt / "model" / shard_filename(0, p)), framework="pt") as fh:
            for n in fh.keys():
                if layer_index(n) is None:
                    out.setdefault(n, set()).add(tag)
    return out


def write_layout(full, meta: dict, out: Path, *, step: int, show_progress: bool = True,
                 placement: dict[str, set[str]] | None = None) -> Path:
    """Write ``full`` (canonical names -> full tensors, or a checkpoint.ShardReader read
    slice by slice) as the TP x PP shards of ``meta['layout']`` into run directory ``out``;
    returns the checkpoint folder."""
    from .. import checkpoint as ck
    from ..config import dump_yaml, from_dict
    from ..model import sharding

    cfg = from_dict(meta["config"])
    tp, pp, ep = meta["layout"]["tp"], meta["layout"]["pp"], meta["layout"].get("ep", 1)
    if isinstance(full, ck.ShardReader):
        names, part = full.names(), full.read
    else:
        names = list(full)

        def part(n, t, tp):
            return sharding.shard(full[n], n, t, tp)

    if cfg.model.tie_embeddings:
        # the last stage's copy of a tied embedding loads from the embedding itself
        # (sharding.canonical_name); older checkpoints may still carry it
        names = [n for n in names if n != "output_layer.weight"]
    stages: list[list[str]] = [[] for _ in range(pp)]
    for name in names:
        for p in stage_of(name, cfg.model.num_layers, pp, placement):
            stages[p].append(name)
    tmp = ck.begin_save(out, step)
    ck.prepare_tmp(tmp)
    (tmp / "model").mkdir()
    with progress_bar(tp * pp, desc=f"writing tp{tp} x pp{pp} shards", enabled=show_progress, unit="file") as bar:
        for p in range(pp):
            for t in range(tp):
                tensors = {n: part(n, t, tp).float().contiguous().clone() for n in stages[p]}
                for e, names_e in enumerate(expert_split(list(tensors), cfg.model.num_moe_experts, ep)):
                    save_file({n: tensors[n] for n in names_e}, str(tmp / "model" / ck.shard_filename(t, p, e)))
                bar.update()
    final = ck.commit_save(out, tmp, step, meta, keep_last=1)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    return final


def expert_split(names: list[str], num_experts: int | None, ep: int) -> list[list[str]]:
    """The names each expert-parallel rank's file holds: rank 0 the non-expert weights and its
    experts, rank e > 0 its experts only (checkpoint.shard_filename(t, p, e))."""
    from ..model.sharding import is_expert

    if ep == 1:
        return [names]
    import re

    per_rank = num_experts // ep
    out: list[list[str]] = [[] for _ in range(ep)]
    for n in names:
        m = re.search(r"\.local_experts\.(\d+)\.", n) if is_expert(n) else None
        out[int(m.group(1)) // per_rank if m else 0].append(n)
    return out


def check_layout(meta: dict, tp: int, pp: int, ep: int = 1) -> dict:
    """The meta config with parallel.tp/pp/ep replaced, validated (one-line errors)."""
    from ..config import ConfigError, from_dict, padded_vocab_size

    if tp < 1 or pp < 1 or ep < 1:
        raise ConvertError(f"--tp, --pp and --ep must be >= 1, got tp={tp} pp={pp} ep={ep}")
    cfgd = copy.deepcopy(meta["config"])
    cfgd["parallel"]["tp"], cfgd["parallel"]["pp"], cfgd["parallel"]["ep"] = tp, pp, ep
    par = cfgd["parallel"]
    # Sequence parallelism means nothing at tp=1; MoE at tp>1 needs it (megatron's MoE layer),
    # and it is proven on the local spec only. Checkpoint names do not depend on the spec, so
    # a Transformer Engine MoE checkpoint resharded to tp>1 continues on the local spec.
    model = cfgd.get("model") or {}
    if tp == 1:
        par["sequence_parallel"] = False
    elif model.get("num_moe_experts"):
        par["sequence_parallel"] = True
        if model.get("transformer_impl") == "transformer_engine":
            model["transformer_impl"] = "local"
            print(f"note: MoE at tp={tp} needs sequence parallelism, which runs on the local spec only: the resharded "
                  "config sets model.transformer_impl=local (same weights)", file=sys.stderr)
    # expert and sequence parallelism run on the megatron engine (zero_stage 0/1)
    if (ep > 1 and par.get("engine") == "deepspeed") or (par.get("sequence_parallel") and par.get("engine", "auto") != "megatron"
                                                          and not (par.get("engine", "auto") == "auto" and (pp > 1 or ep > 1))):
        par["engine"] = "megatron"
        par["zero_stage"] = min(int(par.get("zero_stage", 0)), 1)
    try:
        cfg = from_dict(cfgd)
        padded_vocab_size(int(meta["vocab_size"]), cfg.model, tp)
    except ConfigError as e:
        raise ConvertError(f"layout tp={tp} pp={pp} ep={ep} does not fit this model: {e}") from None
    return cfgd


def reshard(ckpt: str | Path, output: str | Path, *, tp: int, pp: int, ep: int = 1, overwrite: bool = False,
            show_progress: bool = True) -> Path:
    """Checkpoint of any layout -> run directory with a weights-only checkpoint in TP x PP (x EP:
    the experts of MoE layers split over expert-parallel ranks)."""
    from .. import checkpoint as ck

    src = ck.resolve(ckpt)
    meta = ck.read_meta(src)
    cfgd = check_layout(meta, tp, pp, ep)
    out_path = Path(output).resolve()
    if out_path == src.resolve() or src.resolve().is_relative_to(out_path):
        raise ConvertError(f"--output {output} would overwrite the source checkpoint; choose another folder")
    check_output_dir(output, overwrite=overwrite)
    reader = ck.ShardReader(src)  # the target's slices are read shard by shard in write_layout
    placement = source_placement(src, meta)
    out = prepare_output_dir(output, overwrite=overwrite)
    new_meta = {k: v for k, v in meta.items() if k not in ("format_version", "step")}
    new_meta["config"] = cfgd
    new_meta["layout"] = dict(meta["layout"], tp=tp, pp=pp, ep=ep)
    new_meta["engine"] = None
    new_meta["resharded_from"] = {"path": str(src.resolve()), "layout": meta["layout"], "engine": meta.get("engine")}
    return write_layout(reader, new_meta, out, step=int(meta["step"]), show_progress=show_progress, placement=placement)
