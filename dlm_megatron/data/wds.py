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
import sys
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


# --- streaming from URLs (pipe:, file:, local paths) ---------------------------------

def _open_url(url: str):
    """(binary stream, subprocess or None) for a shard URL: `pipe:COMMAND` (the command's
    stdout, as in webdataset), `file:PATH` or a plain local path."""
    import subprocess

    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                bufsize=1 << 20)
        return proc.stdout, proc
    path = url[len("file:"):] if url.startswith("file:") else url
    try:
        return open(path, "rb"), None
    except OSError as exc:
        raise DataError(f"cannot open shard {url} ({exc.strerror}); check the URL") from None


def stream_documents(urls, dtype: np.dtype | type | None = None) -> Iterator[np.ndarray]:
    """Documents of WebDataset token shards streamed in order from `urls`.

    `urls`: a list of URLs (`pipe:cat /data/shard-00000.tar`, `pipe:aws s3 cp s3://b/x.tar -`,
    `file:/p.tar` or a path), or a wds shard directory, whose manifest lists them: its
    optional "urls" entry, else the local shard files in manifest order. Each tar is read
    sequentially (no seeking, so any pipe works); members must be `KEY.tokens.npy`. A
    command that exits non-zero raises DataError.
    """
    if isinstance(urls, (str, Path)) and Path(urls).is_dir():
        urls = manifest_urls(urls)
    elif isinstance(urls, (str, Path)):
        urls = [str(urls)]
    want = None if dtype is None else np.dtype(dtype).newbyteorder("<")
    for url in urls:
        stream, proc = _open_url(str(url))
        try:
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile() or not _MEMBER_RE.match(member.name):
                            raise DataError(f"{url}: unexpected member {member.name!r} "
                                            f"(expected KEY{MEMBER_SUFFIX})")
                        data = tar.extractfile(member).read()
                        try:
                            array = np.lib.format.read_array(io.BytesIO(data),
                                                             allow_pickle=False)
                        except ValueError as exc:
                            raise DataError(f"{url}: member {member.name} is not a .npy "
                                            f"array ({exc})") from None
                        if array.ndim != 1 or (want is not None and array.dtype != want):
                            raise DataError(f"{url}: member {member.name} has shape "
                                            f"{array.shape} dtype {array.dtype}, expected 1-D "
                                            f"{want or 'tokens'}")
                        yield array
            except (tarfile.TarError, EOFError) as exc:
                code = None if proc is None else proc.wait()
                why = f"command exited with status {code}" if code else f"not a readable tar stream ({exc})"
                raise DataError(f"{url}: {why}; check the URL or command") from None
        finally:
            stream.close()
            if proc is not None:
                code = proc.wait()
                if code != 0 and sys.exc_info()[0] is None:
                    raise DataError(f"{url}: command exited with status {code}")


def manifest_urls(shard_dir: str | Path) -> list[str]:
    """Shard URLs of a wds shard directory: manifest["urls"] if present (e.g. pipe: URLs
    of an object store copy), else the local .tar files in manifest order."""
    import json

    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    if manifest.get("format") != "wds":
        raise DataError(f"{shard_dir} holds {manifest.get('format')} shards; streaming needs "
                        "--format wds shards")
    if manifest.get("urls"):
        return list(manifest["urls"])
    return [str(Path(shard_dir) / f"{r['name']}.tar") for r in manifest["shards"]]
