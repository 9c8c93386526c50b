"""On-disk cache of the data layer's index arrays, built once and memory-mapped by every rank.

At trillion-token scale the arrays that address samples are large: the stream position of
every document's end (one int64 per document), the epoch permutation (one entry per
sample, ~560M at 2.3T tokens and 4k context) and a blend's schedule. Building them on every
rank at every start costs minutes and gigabytes per rank. As in Megatron's dataset
builders, one rank builds each array once, writes it under ``data.cache_dir/index/``, and
every rank of this and later runs memory-maps it: start-up and resident memory no longer
grow with the corpus (only the pages a step touches are read).

An entry is a folder ``<kind>-<key>/`` holding one ``.npy`` per array and ``meta.json``
(written last; the folder is built under a temporary name and renamed into place, so a
build killed midway never looks complete). ``key`` hashes everything the arrays depend on
(``desc``: the corpus manifest's hash, sizes, seeds ...), so a changed corpus or setting
gets a new entry and an unchanged one is reused. An entry that is present but does not
match its description (stale) or misses or truncates a file (partial) is refused with one
line: the cache is never silently rebuilt under a run that is reading it.

Permutations are cached for the first ``MAX_CACHED_PASSES`` passes over a dataset; a run
that cycles through a dataset more often than that has a small dataset, whose later
permutations are cheap to build in memory on each rank (and would otherwise leave
thousands of tiny entries).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from dlm_megatron.data import DataError

CACHE_VERSION = 1
MAX_CACHED_PASSES = 16
META_NAME = "meta.json"

Alloc = Callable[[str, tuple, np.dtype], np.ndarray]
"""``alloc(name, shape, dtype)`` -> a writable array the builder fills (a memory-mapped
.npy file in the entry being built, or plain memory when the entry is not cached)."""


def _memory_alloc(name: str, shape: tuple, dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


class IndexCache:
    """Index arrays under ``root/index``; only a cache with ``build=True`` creates entries.

    In a distributed run rank 0 opens its datasets with ``build=True`` first, then every
    other rank with ``build=False`` after a barrier; those ranks only map what rank 0 wrote,
    which therefore must be on a filesystem every node sees.

    Attributes:
        built: names of the entries this process built (for the start-up log and tests).
        opened: names of the entries this process memory-mapped.
    """

    def __init__(self, root: str | Path, *, build: bool):
        self.root = Path(root) / "index"
        self.build = build
        self.built: list[str] = []
        self.opened: list[str] = []

    def entry_dir(self, kind: str, desc: dict) -> Path:
        return self.root / f"{kind}-{_key(kind, desc)[:24]}"

    def get(self, kind: str, desc: dict, builder: Callable[[Alloc], None]) -> dict[str, np.ndarray]:
        """The arrays of entry (kind, desc), memory-mapped; built first (``builder`` fills
        arrays from ``alloc``) if this cache builds and the entry is absent."""
        d = self.entry_dir(kind, desc)
        if not (d / META_NAME).is_file():
            if d.exists():
                raise DataError(f"index cache {d} is partial (no {META_NAME}); delete that folder and rerun "
                                "(rank 0 rebuilds it)")
            if not self.build:
                raise DataError(f"index cache {d} was not found after rank 0 built it: data.cache_dir "
                                f"({self.root.parent}) must be on a filesystem every node sees")
            self._build(d, kind, desc, builder)
        arrays = _open(d, kind, desc)
        self.opened.append(d.name)
        return arrays

    def _build(self, d: Path, kind: str, desc: dict, builder: Callable[[Alloc], None]) -> None:
        tmp = d.parent / f".tmp-{d.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise DataError(f"cannot write the index cache under {self.root} ({exc.strerror or exc}); set "
                            "data.cache_dir to a writable folder every node sees") from None
        made: dict[str, np.ndarray] = {}

        def alloc(name: str, shape: tuple, dtype) -> np.ndarray:
            arr = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
            made[name] = arr
            return arr

        try:
            builder(alloc)
            specs = {}
            for name, arr in made.items():
                arr.flush()
                path = tmp / f"{name}.npy"
                _fsync(path)
                specs[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "file_bytes": path.stat().st_size}
            del made
            (tmp / META_NAME).write_text(json.dumps({"version": CACHE_VERSION, "kind": kind, "desc": desc,
                                                     "arrays": specs}, indent=1) + "\n")
            _fsync(tmp / META_NAME)
            try:
                os.rename(tmp, d)
            except OSError:
                if not (d / META_NAME).is_file():  # not a concurrent builder winning the race
                    raise
            _fsync(d.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.built.append(d.name)


def _key(kind: str, desc: dict) -> str:
    text = json.dumps({"version": CACHE_VERSION, "kind": kind, "desc": desc}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _build_in_memory(builder: Callable[[Alloc], None]) -> dict[str, np.ndarray]:
    made: dict[str, np.ndarray] = {}

    def alloc(name: str, shape: tuple, dtype) -> np.ndarray:
        made[name] = np.empty(tuple(shape), dtype=np.dtype(dtype))
        return made[name]

    builder(alloc)
    for arr in made.values():
        arr.setflags(write=False)
    return made


def _open(d: Path, kind: str, desc: dict) -> dict[str, np.ndarray]:
    """Map an entry's arrays after checking it is the one asked for and complete."""
    def partial(why: str) -> DataError:
        return DataError(f"index cache {d} is partial ({why}); delete that folder and rerun (rank 0 rebuilds it)")

    try:
        meta = json.loads((d / META_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise partial(f"{META_NAME} unreadable: {type(exc).__name__}") from None
    if not _meta_well_formed(meta):
        raise partial(f"{META_NAME} is not an index-cache description")
    # desc goes through JSON in meta.json: compare it the same way
    want = json.loads(json.dumps(desc))
    if meta.get("version") != CACHE_VERSION or meta.get("kind") != kind or meta.get("desc") != want:
        raise DataError(f"index cache {d} is stale (built for {meta.get('kind')} {meta.get('desc')}, "
                        f"version {meta.get('version')}; this run needs {kind} {want}, version {CACHE_VERSION}); "
                        "delete that folder and rerun (rank 0 rebuilds it)")
    arrays = _Arrays(partial)
    for name, spec in meta["arrays"].items():
        path = d / f"{name}.npy"
        if not path.is_file():
            raise partial(f"{path.name} is missing")
        if path.stat().st_size != spec["file_bytes"]:
            raise partial(f"{path.name} has {path.stat().st_size} bytes, {META_NAME} says {spec['file_bytes']}")
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise partial(f"{path.name} is not a .npy array: {exc}") from None
        if arr.dtype.str != spec["dtype"] or list(arr.shape) != spec["shape"]:
            raise partial(f"{path.name} holds {arr.dtype.str}{list(arr.shape)}, {META_NAME} says "
                          f"{spec['dtype']}{spec['shape']}")
        arrays[name] = arr
    return arrays


def _meta_well_formed(meta) -> bool:
    """meta.json has the shape _build writes (a hand-edited or foreign file must not traceback)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), dict):
        return False
    return all(isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
               and isinstance(spec.get("file_bytes"), int) for spec in meta["arrays"].values())


class _Arrays(dict):
    """An entry's arrays; asking for one the entry lacks is a partial entry, not a KeyError."""

    def __init__(self, partial: Callable[[str], DataError]):
        super().__init__()
        self._partial = partial

    def __missing__(self, name: str):
        raise self._partial(f"no array {name!r} in {META_NAME}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def permutation(n: int, key: list[int], cache: IndexCache | None = None) -> np.ndarray:
    """A read-only permutation of range(n) seeded by the integer list ``key`` (PCG64), from
    ``cache`` when given. Stored as int32 below 2**31 samples (half the bytes; the values are
    the same)."""
    def build(alloc: Alloc) -> None:
        perm = np.random.Generator(np.random.PCG64(key)).permutation(n)
        out = alloc("perm", (n,), np.int32 if n < 2**31 else np.int64)
        out[:] = perm

    if cache is None:
        return _build_in_memory(build)["perm"]
    return cache.get("perm", {"n": int(n), "key": [int(k) for k in key]}, build)["perm"]
