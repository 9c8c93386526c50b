"""Checkpoint saves that do not stall training and cannot corrupt it.

A save has three phases:

1. stage (training thread, at the step that triggers the save): every tensor this rank will
   write is copied off the compute device into host buffers that are kept from one save to
   the next (``HostStaging``: pinned and non-blocking on GPU, one stream sync at the end; no
   allocation at the saving step). The collectives a save needs (ZeRO-3's parameter gather;
   the megatron engine's deferred parameter all-gather, which the next forward would run
   anyway) happen here, in step with the other ranks; optimizer state is staged without any
   (each rank copies the fragments it holds, engine/zero_state.py).
2. write (a background thread per rank): the staged files go into the checkpoint's
   temporary folder ``checkpoints/.tmp-step_N`` and each is fsynced, while training goes
   on. File writes release the GIL.
3. commit (rank 0, also in the background): once every rank reports its files written and
   fsynced (the training loop's per-step all-reduce carries the flags, so there is no
   extra collective and never a collective from a thread), meta.json is written and
   fsynced, the folder renamed to ``step_N`` and ``latest`` replaced atomically
   (checkpoint.commit_save); older checkpoints are pruned. ``latest`` therefore only ever
   names a complete checkpoint.

One save is in flight at a time: a save still in flight when the next one is due, or when
training ends, is preempted or stops on non-finite losses, is awaited (and committed)
first. A crash at any moment leaves the previous checkpoint and ``latest`` intact; the next
start removes what the interrupted save left (checkpoint.clean_stale). A write or commit
that fails (e.g. a full disk) stops training on every rank with a one-line error naming
the step; the previous checkpoint stays ``latest``.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt


@dataclass
class StagedFile:
    """One file of a checkpoint, already in host memory: ``tensors`` (written as
    safetensors, with string ``metadata``) or ``obj`` (written with torch.save)."""

    relpath: str
    tensors: dict[str, torch.Tensor] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    obj: object = None


class HostStaging:
    """Host buffers a rank's checkpoint is copied into, kept from one save to the next (the
    next save stages only after the previous one was written): no allocation, page faults
    or, on GPU, pinning of fresh memory at the saving step. Costs one host copy of what this
    rank writes, for as long as the run lives."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()

    def begin(self) -> None:
        self._used = set()

    def copy(self, key: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host copy of ``t`` (as ``dtype``) that later updates of ``t`` cannot touch. From a
        GPU it goes into pinned memory without blocking; ``done()`` waits for those copies."""
        t = t.detach()
        dtype = dtype or t.dtype
        buf = self._bufs.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != dtype:
            buf = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=t.is_cuda)
            self._bufs[key] = buf
        self._used.add(key)
        buf.copy_(t, non_blocking=t.is_cuda)
        return buf

    def done(self) -> None:
        """Wait for this save's device-to-host copies; drop buffers it did not use."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()
        for k in set(self._bufs) - self._used:
            del self._bufs[k]


def host_tree(obj):
    """``obj`` (nested dicts/lists/tuples) with every tensor replaced by a fresh host copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_tree(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_tree(v) for v in obj)
    return obj


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      after_tensor=None) -> None:
    """Write ``tensors`` (host memory) as a safetensors file, streaming each tensor's bytes
    (no serialised copy of the whole file in memory), then fsync it. ``after_tensor(i)`` is
    called after the i-th tensor (test hook)."""
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, n in enumerate(names):
            t = tensors[n].contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if after_tensor is not None:
                after_tensor(i)
        f.flush()
        os.fsync(f.fileno())


def write_files(tmp: Path, files: list[StagedFile], step: int) -> None:
    """Write and fsync ``files`` under ``tmp`` (their folders too)."""
    dirs = set()
    for k, sf in enumerate(files):
        path = tmp / sf.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        dirs.add(path.parent)
        if sf.tensors is not None:
            # kill -9 test: the first file of this rank half written
            hook = (lambda i: ckpt.kill_point("writing", step)) if k == 0 and len(sf.tensors) > 1 else None
            write_safetensors(path, sf.tensors, sf.metadata, after_tensor=hook)
        else:
            with open(path, "wb") as f:
                torch.save(sf.obj, f)
                f.flush()
                os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        ckpt.fsync_dir(d)
    ckpt.fsync_dir(tmp)


class _Save:
    """One save in flight: its writer thread, then (rank 0) its commit thread."""

    def __init__(self, step: int, tmp: Path, meta: dict | None):
        self.step, self.tmp, self.meta = step, tmp, meta
        self.error: BaseException | None = None
        self.written = threading.Event()
        self.writer: threading.Thread | None = None
        self.committer: threading.Thread | None = None

    def run(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # reported through failed() on every rank
            self.error = exc


class AsyncSaver:
    """``start`` hands staged files to a writer thread; the training loop feeds ``busy`` and
    ``failed`` into its per-step all-reduce and calls ``poll`` with the results, so every
    rank agrees when a save is written everywhere (rank 0 then commits it, in the
    background); ``wait`` awaits and commits the save in flight at a point every rank
    reaches (the next save, the end, preemption, a stop). ``background=False`` writes and
    commits within ``start``."""

    def __init__(self, out: Path, *, rank0: bool, background: bool, keep_last: int):
        self.out, self.rank0, self.background, self.keep_last = out, rank0, background, keep_last
        self.staging = HostStaging()
        self.pending: _Save | None = None

    # -- the saving step ------------------------------------------------------------------
    def start(self, step: int, tmp: Path, files: list[StagedFile], meta: dict | None) -> None:
        """Hand ``files`` (staged through ``self.staging``, copies maybe still in flight
        from a GPU) to the writer; ``meta`` is rank 0's meta.json. Every rank calls it."""
        assert self.pending is None, "wait() for the previous save first"
        self.staging.done()
        ckpt.kill_point("staged", step)
        s = self.pending = _Save(step, tmp, meta)

        def work():
            s.run(lambda: (write_files(tmp, files, step), ckpt.kill_point("written", step)))
            s.written.set()

        if self.background:
            s.writer = threading.Thread(target=work, name=f"dlm-save-{step}", daemon=True)
            s.writer.start()
        else:
            work()
            self.wait()

    # -- every step -----------------------------------------------------------------------
    def busy(self) -> float:
        """1 while this rank's files of the save in flight are still being written."""
        return 1.0 if self.pending is not None and not self.pending.written.is_set() else 0.0

    def failed(self) -> float:
        """1 if this rank's writes (or rank 0's commit) of the save in flight failed."""
        return 1.0 if self.pending is not None and self.pending.error is not None else 0.0

    def poll(self, any_busy: float, any_failed: float) -> None:
        """Every rank, every step, with the all-reduced (max) ``busy()`` and ``failed()``:
        raise if any rank failed; once no rank is writing, rank 0 commits in the background
        (the other ranks are done with this save); a finished commit is forgotten."""
        if any_failed > 0:
            self._raise()
        s = self.pending
        if s is None or any_busy > 0:
            return
        if not self.rank0:
            self.pending = None
        elif s.committer is None:
            s.committer = threading.Thread(target=s.run, args=(lambda: self._publish(s),), name=f"dlm-commit-{s.step}",
                                           daemon=True)
            s.committer.start()
        elif not s.committer.is_alive() and s.error is None:
            self.pending = None

    def _publish(self, s: _Save) -> None:
        final = ckpt.commit_save(self.out, s.tmp, s.step, s.meta, self.keep_last)
        print(f"saved checkpoint {final}", flush=True)

    def _raise(self):
        s, self.pending = self.pending, None
        what = f"checkpoint step {s.step}" if s is not None else "the checkpoint in flight"
        why = f"{type(s.error).__name__}: {s.error}" if s is not None and s.error is not None else "on another rank"
        raise ckpt.CheckpointError(f"saving {what} failed ({why}); the previous checkpoint in "
                                   f"{ckpt.checkpoints_root(self.out)} is still the latest")

    # -- points every rank reaches --------------------------------------------------------
    def wait(self) -> None:
        """Await the save in flight: every rank's writes, then rank 0's commit. A few tiny
        collectives: every rank must call this at the same point."""
        from .parallel import comm

        if comm.max_host(0.0 if self.pending is None else 1.0) == 0:
            return
        s = self.pending
        if s is not None and s.writer is not None:
            s.writer.join()
        if comm.max_host(self.failed()) > 0:
            self._raise()
        if s is not None and self.rank0:
            if s.committer is None:
                s.run(lambda: self._publish(s))
            else:
                s.committer.join()
        if comm.max_host(self.failed()) > 0:
            self._raise()
        self.pending = None
