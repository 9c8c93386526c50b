"""Checkpoints: atomic, resumable, and readable without the training layout.

Layout of ``<output_dir>/checkpoints/``::

    step_000050/
        meta.json                 step, config, layout, tokenizer hash, format version
        model/tp{T}_pp{P}.safetensors   this (TP, PP) rank's weights under canonical names
        engine/                   optimizer/engine state (DeepSpeed or megatron-core)
    latest                        text file naming the newest complete checkpoint

A checkpoint is written into ``.tmp-step_XXXXXX`` by all ranks and renamed into place by
rank 0 only after every rank finished (a crash mid-save leaves the previous checkpoint and
``latest`` untouched); ``latest`` itself is replaced with an atomic ``os.replace``.
The model shards use canonical (global-layer, full-model) names, so tools can merge them to
a full state dict (``load_full_state_dict``) for export, generation or a different layout.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import sharding

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint path problem, phrased for the user."""


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named by ``<output_dir>/checkpoints/latest``, or None."""
    root = checkpoints_root(output_dir)
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    path = root / name
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{ptr} points to '{name}', which is missing or incomplete; fix or delete the pointer")
    return path


def resolve(path: str | Path) -> Path:
    """``--ckpt`` semantics: a run directory (its latest checkpoint), a checkpoints/ folder,
    or one checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path '{path}' does not exist (pass a run directory or a checkpoints/step_* folder)")
    if (p / "meta.json").is_file():
        return p
    if (p / "latest").is_file():
        return latest_checkpoint(p.parent) if p.name == "checkpoints" else _follow(p)
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointError(f"'{path}' holds no checkpoint (expected meta.json, or checkpoints/latest in a run directory)")
    return found


def _follow(root: Path) -> Path:
    name = (root / "latest").read_text().strip()
    if not (root / name / "meta.json").is_file():
        raise CheckpointError(f"{root / 'latest'} points to missing checkpoint '{name}'")
    return root / name


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json is unreadable ({e}); the checkpoint is corrupt") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has format version {meta.get('format_version')}, this dlm_megatron reads {FORMAT_VERSION}")
    return meta


def shard_filename(tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
    """Model shard of a (TP, PP) rank; expert-parallel ranks > 0 add a file of their experts."""
    return f"tp{tp_rank}_pp{pp_rank}{f'_ep{ep_rank}' if ep_rank else ''}.safetensors"


def save_model_shard(directory: Path, named_params, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> None:
    """Write this rank's parameters (canonical name -> local tensor) as fp32 safetensors."""
    (directory / "model").mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().float().contiguous().cpu().clone() for n, p in named_params}
    save_file(tensors, str(directory / "model" / shard_filename(tp_rank, pp_rank, ep_rank)))


def load_full_state_dict(ckpt: Path, progress=None) -> dict[str, torch.Tensor]:
    """Merge every (TP, PP) shard of a checkpoint into the full model (canonical names)."""
    meta = read_meta(ckpt)
    tp, pp, ep = meta["layout"]["tp"], meta["layout"]["pp"], meta["layout"].get("ep", 1)
    full: dict[str, torch.Tensor] = {}
    for p in range(pp):
        parts = []
        for t in range(tp):
            part = {}
            for e in range(ep):  # expert-parallel ranks hold disjoint experts (canonical names)
                f = ckpt / "model" / shard_filename(t, p, e)
                if not f.is_file():
                    raise CheckpointError(f"{ckpt} is missing model shard {f.name} (expected TP={tp} x PP={pp} x EP={ep} shards)")
                try:
                    part.update(load_file(str(f)))
                except Exception as ex:  # safetensors raises several types on corrupt files
                    raise CheckpointError(f"model shard {f} is corrupt ({type(ex).__name__}); restore it or use an older checkpoint") from None
                if progress:
                    progress(f.name)
            parts.append(part)
        for name in parts[0]:
            full[name] = sharding.unshard([sd[name] for sd in parts], name)
    return full


def local_state_from_full(full: dict[str, torch.Tensor], model: torch.nn.Module, cfg, *, tp_rank: int, pp_rank: int,
                          ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """Slice a full state dict into this rank's local parameter dict (for load_state_dict):
    its TP slice, its PP stage's layers and its expert-parallel rank's experts."""
    from .model.denoiser import expert_offset, layer_offset

    off, eoff = layer_offset(cfg, pp_rank), expert_offset(cfg, ep_rank)
    out = {}
    state = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n.endswith(".router.expert_bias"))]
    for local_name, p in state:
        g = sharding.canonical_name(local_name, off, cfg.model.tie_embeddings, eoff)
        if g not in full:
            raise CheckpointError(f"checkpoint has no parameter '{g}' (was it trained with a different model config?)")
        t = sharding.shard(full[g], g, tp_rank, cfg.parallel.tp)
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"parameter '{g}' has shape {tuple(t.shape)} in the checkpoint but {tuple(p.shape)} in the model")
        out[local_name] = t
    return out


def begin_save(output_dir: str | Path, step: int) -> Path:
    """Temporary folder all ranks write into (created by rank 0 before a barrier)."""
    tmp = checkpoints_root(output_dir) / f".tmp-{step_dirname(step)}"
    return tmp


def prepare_tmp(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def commit_save(output_dir: str | Path, tmp: Path, step: int, meta: dict, keep_last: int) -> Path:
    """Rank 0, after all ranks wrote into ``tmp``: meta.json, rename into place, move
    ``latest``, prune old checkpoints."""
    root = checkpoints_root(output_dir)
    meta = dict(meta, format_version=FORMAT_VERSION, step=step)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    final = root / step_dirname(step)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        trash = root / f".trash-{step_dirname(step)}"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    ptr_tmp = root / ".latest.tmp"
    ptr_tmp.write_text(final.name + "\n")
    os.replace(ptr_tmp, root / "latest")
    _fsync_dir(root)
    prune(root, keep_last)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def clean_stale(output_dir: str | Path) -> list[str]:
    """Rank 0 at the start of training, before any save: remove what an interrupted save left
    behind (``.tmp-step_*`` folders, ``.latest.tmp``). A ``.trash-step_X`` is the previous
    copy of step_X moved aside while step_X was being replaced: it is put back if the new
    step_X never arrived, removed otherwise. Returns the names handled, for the log."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    done = []
    for p in sorted(root.glob(".trash-*")):
        final = root / p.name[len(".trash-"):]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)
        done.append(p.name)
    for p in sorted(root.glob(".tmp-*")):
        shutil.rmtree(p, ignore_errors=True)
        done.append(p.name)
    if (root / ".latest.tmp").exists():
        (root / ".latest.tmp").unlink()
        done.append(".latest.tmp")
    return done


def check_torch_files(directory: str | Path) -> None:
    """Every ``*.pt`` file under ``directory`` (engine/optimizer state) must be a complete
    torch archive: a zip whose central directory, written last, is present. A truncated or
    overwritten file is named here instead of failing deep inside torch.load."""
    for f in sorted(Path(directory).rglob("*.pt")):
        if not zipfile.is_zipfile(f):
            raise CheckpointError(f"checkpoint file {f} is corrupt (truncated or not a torch archive); restore it, "
                                  f"or point checkpoints/latest at an older checkpoint")


def prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    for p in steps[:-keep_last] if keep_last > 0 else []:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        # stale temp folders from crashed saves (ours was renamed already)
        shutil.rmtree(p, ignore_errors=True)
