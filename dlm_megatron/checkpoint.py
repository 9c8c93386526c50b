"""Checkpoints: atomic, resumable, and readable without the training layout.

Layout of ``<output_dir>/checkpoints/``::

    step_000050/
        meta.json                 step, config, layout, tokenizer hash, format version
        model/tp{T}_pp{P}.safetensors   this (TP, PP) rank's weights under canonical names
        optim/tp{T}_pp{P}_dp{D}.safetensors   both engines: Adam's state per parameter
                                  fragment (engine/zero_state.py), loadable at any DP size
        engine/                   checkpoints written before optim/: DeepSpeed's own format, or
                                  megatron-core's optimizer state gathered to DP rank 0
    latest                        text file naming the newest complete checkpoint

A checkpoint is written into ``.tmp-step_XXXXXX`` by all ranks (in the background:
saving.py) and renamed into place by rank 0 only after every rank's files are written and
fsynced (a crash mid-save leaves the previous checkpoint and ``latest`` untouched; the next
start removes the leftovers, ``clean_stale``); ``latest`` itself is replaced with an atomic
``os.replace`` of a fsynced file.
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
from safetensors.torch import load_file

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


class ShardReader:
    """Reads canonical tensors, or one tensor-parallel rank's slice of them, from a
    checkpoint's model shards without loading anything else.

    Files are opened with safetensors' ``safe_open`` (a memory map: only the header is read
    on open) and tensors are cut with ``get_slice``, so a rank at TP=t, PP=p reads about
    1/(t x p) of the weights whatever layout wrote them: for each slice it needs, only the
    rows (or columns) of the source TP shards that overlap it. ``bytes_read`` counts the
    tensor bytes actually read; ``total_bytes`` is the full model's.
    """

    def __init__(self, ckpt: Path, subdir: str = "model"):
        meta = read_meta(ckpt)
        self.ckpt, self.subdir = ckpt, subdir
        self.tp, self.pp, self.ep = meta["layout"]["tp"], meta["layout"]["pp"], meta["layout"].get("ep", 1)
        self.bytes_read = 0
        self._handles: dict[tuple[int, int, int], object] = {}
        # canonical name -> (pipeline stage, expert-parallel file) whose shards hold it:
        # EP rank e > 0 writes its experts to their own file (shard_filename(t, p, e))
        self._stage: dict[str, tuple[int, int]] = {}
        self.total_bytes = 0
        for p in range(self.pp):
            for e in range(self.ep):
                fh = self._open(0, p, e)
                for name in fh.keys():
                    if name not in self._stage:
                        self._stage[name] = (p, e)
                        sl = fh.get_slice(name)
                        shape = sharding.full_shape(tuple(sl.get_shape()), name, self.tp)
                        self.total_bytes += _numel(shape) * _DTYPE_BYTES[sl.get_dtype()]

    def _open(self, t: int, p: int, e: int = 0):
        if (t, p, e) not in self._handles:
            from safetensors import safe_open

            f = self.ckpt / self.subdir / shard_filename(t, p, e)
            if not f.is_file():
                raise CheckpointError(f"{self.ckpt} is missing model shard {f.name} "
                                      f"(expected TP={self.tp} x PP={self.pp} x EP={self.ep} shards)")
            try:
                self._handles[(t, p, e)] = safe_open(str(f), framework="pt")
            except Exception as ex:  # safetensors raises several types on corrupt files
                raise CheckpointError(f"model shard {f} is corrupt ({type(ex).__name__}); restore it or use an older checkpoint") from None
        return self._handles[(t, p, e)]

    def names(self) -> list[str]:
        return list(self._stage)

    def __contains__(self, name: str) -> bool:
        return name in self._stage

    def read(self, name: str, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
        """The part of canonical tensor ``name`` that TP rank ``tp_rank`` of ``tp_size``
        holds (``sharding.shard`` of the full tensor), reading only what overlaps it."""
        p, e = self._stage[name]
        dim = sharding.partition_dim(name)
        if dim is None:  # replicated: every source TP shard holds it whole
            return self._take(self._open(0, p, e).get_slice(name), None, None, None)
        n_src = self._open(0, p, e).get_slice(name).get_shape()[dim]
        full = n_src * self.tp
        parts = []
        for lo, hi in _tp_intervals(name, full, tp_rank, tp_size):
            for s in range(self.tp):
                for s_lo, s_hi, local in _tp_pieces(name, full, s, self.tp):
                    a, b = max(lo, s_lo), min(hi, s_hi)
                    if a < b:
                        parts.append(self._take(self._open(s, p, e).get_slice(name), dim, a - s_lo + local, b - s_lo + local))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def _take(self, sl, dim, lo, hi) -> torch.Tensor:
        if dim is None:
            t = sl[:]
        elif dim == 0:
            t = sl[lo:hi]
        else:
            t = sl[:, lo:hi]
        self.bytes_read += t.numel() * t.element_size()
        return t


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _tp_pieces(name: str, full: int, rank: int, size: int) -> list[tuple[int, int, int]]:
    """(start, stop, local offset) in full coordinates along the partition dimension of
    what TP rank ``rank`` of ``size`` holds, in its local order: one contiguous range, or for
    SwiGLU's fused [gate; up] its gate rows then its up rows (see model/sharding.py)."""
    if sharding.is_glu(name):
        half, h = full // 2, full // 2 // size
        return [(rank * h, (rank + 1) * h, 0), (half + rank * h, half + (rank + 1) * h, h)]
    n = full // size
    return [(rank * n, (rank + 1) * n, 0)]


def _tp_intervals(name: str, full: int, rank: int, size: int) -> list[tuple[int, int]]:
    return [(a, b) for a, b, _ in _tp_pieces(name, full, rank, size)]


def load_local_state(ckpt: Path, model: torch.nn.Module, cfg, *, tp_rank: int, pp_rank: int,
                     ep_rank: int = 0) -> tuple[dict, ShardReader]:
    """This rank's parameter dict (for load_state_dict) read straight from a checkpoint of
    any layout, slice by slice; returns it with the reader (``bytes_read``, ``total_bytes``)."""
    reader = ShardReader(ckpt)
    return local_state(reader, model, cfg, tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank), reader


def local_state(source, model: torch.nn.Module, cfg, *, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """This rank's local parameter dict from ``source``: a ShardReader (reads only this
    rank's slices) or a full state dict (canonical names, full tensors): its TP slice, its
    PP stage's layers and its expert-parallel rank's experts (and their router biases)."""
    from .model.denoiser import expert_offset, layer_offset

    off, eoff = layer_offset(cfg, pp_rank), expert_offset(cfg, ep_rank)
    out = {}
    state = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n.endswith(".router.expert_bias"))]
    for local_name, p in state:
        g = sharding.canonical_name(local_name, off, cfg.model.tie_embeddings, eoff)
        if g not in source:
            raise CheckpointError(f"checkpoint has no parameter '{g}' (was it trained with a different model config?)")
        if isinstance(source, ShardReader):
            t = source.read(g, tp_rank, cfg.parallel.tp)
        else:
            t = sharding.shard(source[g], g, tp_rank, cfg.parallel.tp)
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"parameter '{g}' has shape {tuple(t.shape)} in the checkpoint but {tuple(p.shape)} in the model")
        out[local_name] = t
    return out


def local_state_from_full(full: dict[str, torch.Tensor], model: torch.nn.Module, cfg, *, tp_rank: int, pp_rank: int,
                          ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """Slice a full state dict into this rank's local parameter dict (for load_state_dict)."""
    return local_state(full, model, cfg, tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank)


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
    with open(tmp / "meta.json", "w") as f:
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
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
    fsync_dir(root)
    kill_point("renamed", step)
    ptr_tmp = root / ".latest.tmp"
    with open(ptr_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(ptr_tmp, root / "latest")
    fsync_dir(root)
    prune(root, keep_last)
    return final


def kill_point(phase: str, step: int) -> None:
    """Test hook: ``DLM_TEST_KILL_SAVE=PHASE@STEP`` (or ``PHASE@STEP@RANK``: that rank only)
    kills this process with SIGKILL, as ``kill -9`` would, when the save of STEP reaches
    PHASE: ``staged`` (copied to host, no file written), ``writing`` (this rank's first file
    half written), ``written`` (every file of this rank written and fsynced, nothing
    committed), ``renamed`` (rank 0: the folder in place, ``latest`` not moved yet)."""
    want = os.environ.get("DLM_TEST_KILL_SAVE")
    if want and want in (f"{phase}@{step}", f"{phase}@{step}@{os.environ.get('RANK', '0')}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
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
