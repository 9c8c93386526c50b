"""WebDataset-compatible token shards: plain (uncompressed) tar files.

Layout of one shard: one tar member per document, in corpus order,

    {key}.tokens.npy      key = 12-digit global document number, e.g. 000000000042

holding the document's token ids as a 1-D little-endian NumPy `.npy` array (uint16 when
the vocabulary fits, else int32). `webdataset.WebDataset(path).decode()` yields samples
{"__key__": key, "tokens.npy": array}; this module reads the same files without the
`webdataset` package, memory-mapping the tar so documents are zero-copy views.

Archives are deterministic (fixed mtime/owner/mode, USTAR headers): the same documents
always give the same bytes, so manifests can pin them by sha256.
"""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from dlm_megatron.data import DataError

MEMBER_SUFFIX = ".tokens.npy"
_MEMBER_RE = re.compile(r"^(\d{12})\.tokens\.npy$")
_NPY_HEADER_MAX = 4096  # npy v1 headers written by numpy are 64-128 bytes


class WdsShardWriter:
    """Write documents into one tar shard; use as a context manager."""

    def __init__(self, path: str | Path, dtype: np.dtype | type, first_key: int = 0) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._next_key = first_key
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document as `{key}.tokens.npy`."""
        array = np.ascontiguousarray(np.asarray(tokens).astype(self.dtype, copy=False))
        buf = io.BytesIO()
        np.lib.format.write_array(buf, array, version=(1, 0), allow_pickle=False)
        info = tarfile.TarInfo(f"{self._next_key:012d}{MEMBER_SUFFIX}")
        # Fixed metadata: otherwise mtime/owner would make every rebuild differ.
        info.size, info.mtime, info.mode = buf.tell(), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        buf.seek(0)
        self._tar.addfile(info, buf)
        self._next_key += 1

    def close(self) -> None:
        """Finish the archive."""
        self._tar.close()

    def __enter__(self) -> WdsShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class WdsShardReader:
    """Validated, memory-mapped view of one tar shard.

    Attributes:
        keys: the document keys in archive order.
        lengths: int64[num_documents] tokens per document.
        dtype: token dtype (all documents of a shard share it).
    """

    def __init__(self, path: str | Path, dtype: np.dtype | type | None = None) -> None:
        self.path = Path(path)
        self.dtype = None if dtype is None else np.dtype(dtype).newbyteorder("<")
        self._map = self._open_map()
        self.keys: list[str] = []
        offsets, lengths = [], []
        for key, data_offset, size in self._members():
            npy_offset, length = self._parse_npy(key, data_offset, size)
            self.keys.append(key)
            offsets.append(npy_offset)
            lengths.append(length)
        self._data_offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.token_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.token_offsets[1:])

    @property
    def num_documents(self) -> int:
        """Documents in the shard."""
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Tokens in the shard."""
        return int(self.token_offsets[-1])

    def document(self, i: int) -> np.ndarray:
        """Document `i` as a read-only zero-copy view."""
        count, offset = int(self.lengths[i]), int(self._data_offsets[i])
        return np.frombuffer(self._map, self.dtype, count, offset)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.document(i) for i in range(self.num_documents))

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the shard's documents concatenated (a copy)."""
        first = int(np.searchsorted(self.token_offsets, start, side="right")) - 1
        parts, doc = [], max(first, 0)
        while doc < self.num_documents and self.token_offsets[doc] < stop:
            lo = max(start - int(self.token_offsets[doc]), 0)
            hi = min(stop - int(self.token_offsets[doc]), int(self.lengths[doc]))
            parts.append(self.document(doc)[lo:hi])
            doc += 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def _fail(self, what: str) -> DataError:
        return DataError(f"{self.path}: {what}; the shard is corrupt, re-create it with "
                         "tools/shard.py")

    def _open_map(self) -> np.ndarray:
        """Memory-map the archive (np.memmap refuses empty files, so check first)."""
        if not self.path.is_file():
            raise DataError(f"shard {self.path} is missing; re-create it with tools/shard.py")
        if self.path.stat().st_size == 0:
            raise self._fail("empty file")
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def _members(self) -> Iterator[tuple[str, int, int]]:
        """(key, data offset, size) of each member, checking names and order."""
        try:
            with tarfile.open(self.path, "r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise self._fail(f"not a readable tar archive ({exc})") from None
        for member in members:
            match = _MEMBER_RE.match(member.name)
            if not member.isfile() or not match:
                raise self._fail(f"unexpected member {member.name!r} (expected KEY{MEMBER_SUFFIX})")
            if member.offset_data + member.size > len(self._map):
                raise self._fail(f"member {member.name} runs past the end of the file")
            yield match.group(1), member.offset_data, member.size

    def _parse_npy(self, key: str, offset: int, size: int) -> tuple[int, int]:
        """Validate one `.npy` member; return (offset of its data, number of tokens)."""
        head = io.BytesIO(bytes(self._map[offset : offset + min(size, _NPY_HEADER_MAX)]))
        try:
            version = np.lib.format.read_magic(head)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(head)
        except ValueError as exc:
            raise self._fail(f"member {key}{MEMBER_SUFFIX} is not a .npy array ({exc})") from None
        dtype = np.dtype(dtype)
        if self.dtype is None:
            self.dtype = dtype
        if len(shape) != 1 or dtype != self.dtype:
            raise self._fail(f"member {key}{MEMBER_SUFFIX} has shape {shape} dtype {dtype}, "
                             f"expected a 1-D {self.dtype} array")
        data_offset = offset + head.tell()
        if head.tell() + shape[0] * dtype.itemsize != size:
            raise self._fail(f"member {key}{MEMBER_SUFFIX} is truncated")
        return data_offset, int(shape[0])
