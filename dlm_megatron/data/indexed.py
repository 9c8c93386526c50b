"""Megatron's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`), written from its spec.

`.bin` is the raw token arrays back to back. `.idx` is, little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    <Q        version (1)
    <B        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
              7 float32, 8 uint16)
    <Q        S = number of sequences
    <Q        D = number of entries in the document index (= documents + 1)
    S int32   sequence lengths (tokens)
    S int64   sequence byte offsets into .bin
    D int64   document index: sequence index where each document starts, then S
    [S int8   sequence modes, multimodal files only]

This writer stores one sequence per document. The reader accepts any file megatron-core
writes (several sequences per document too) as long as sequences are stored back to back,
which every Megatron writer does; that makes `.bin` itself the flat token stream.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dlm_megatron.data import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
_MAX_SEQUENCE = 2**31 - 1  # lengths are int32 on disk


def bin_path(prefix: str | Path) -> Path:
    """Path of the token data file for `prefix`."""
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    """Path of the index file for `prefix`."""
    return Path(f"{prefix}.idx")


class IndexedWriter:
    """Stream documents into `PREFIX.bin`; `finalize()` writes `PREFIX.idx`.

    Use as a context manager; the index is only written on a clean exit, so a crash never
    leaves a valid-looking but truncated dataset.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"dtype {self.dtype} has no Megatron code; use one of "
                            f"{sorted(str(d) for d in CODE_OF_DTYPE)}")
        self._bin: BinaryIO | None = open(bin_path(prefix), "wb")
        self._lengths: list[int] = []

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document (stored as one sequence)."""
        array = np.asarray(tokens, dtype=self.dtype)
        if array.ndim != 1 or array.size > _MAX_SEQUENCE:
            raise DataError(f"a document must be a 1-D array of at most {_MAX_SEQUENCE} "
                            f"tokens, got shape {array.shape}; split it before writing")
        assert self._bin is not None, "add_document after finalize"
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(int(array.size))

    def finalize(self) -> None:
        """Close `.bin` and write `.idx`."""
        if self._bin is None:
            return
        self._bin.close()
        self._bin = None
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = _pointers(lengths, self.dtype.itemsize)
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(idx_path(self.prefix), "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_index.tobytes(order="C"))

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        elif self._bin is not None:
            self._bin.close()
            self._bin = None


def _pointers(lengths: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence when stored back to back."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


def _read_header(path: Path) -> tuple[np.dtype, int, int]:
    """Parse the fixed 34-byte `.idx` header: (dtype, sequences, document-index entries)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"index file {path} is missing; re-create the shard with "
                        "tools/shard.py") from None
    if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
        raise DataError(f"{path} is not a Megatron .idx file (bad magic or truncated header); "
                        "re-create the shard with tools/shard.py")
    version, code, num_seq, num_doc_idx = struct.unpack("<QBQQ", head[len(MAGIC):])
    if version != VERSION:
        raise DataError(f"{path} has index version {version}, only {VERSION} is supported; "
                        "re-create the shard with tools/shard.py")
    if code not in DTYPE_CODES:
        raise DataError(f"{path} has unknown dtype code {code}; re-create the shard")
    return DTYPE_CODES[code], num_seq, num_doc_idx


class IndexedReader:
    """Memory-mapped reader of a Megatron indexed dataset, validated on open.

    Attributes:
        dtype: token dtype.
        sequence_lengths (int32[S]), sequence_pointers (int64[S]), document_indices
        (int64[D+1]): the index arrays, as in megatron-core.
        tokens: the whole `.bin` as one flat memory-mapped array.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self.idx_file, self.bin_file = idx_path(prefix), bin_path(prefix)
        self.dtype, num_seq, num_doc_idx = _read_header(self.idx_file)
        self._check_idx_size(num_seq, num_doc_idx)
        idx = np.memmap(self.idx_file, dtype=np.uint8, mode="r")
        offset = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(idx, np.int32, num_seq, offset)
        offset += 4 * num_seq
        self.sequence_pointers = np.frombuffer(idx, np.int64, num_seq, offset)
        offset += 8 * num_seq
        self.document_indices = np.frombuffer(idx, np.int64, num_doc_idx, offset)
        self._check_index_arrays()
        self.tokens = self._map_bin()

    @property
    def num_sequences(self) -> int:
        """Number of sequences (equals documents for files this module writes)."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens in `.bin`."""
        return len(self.tokens)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence `i` as a read-only view."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    def document_token_offsets(self) -> np.ndarray:
        """int64[num_documents + 1]: token offset where each document starts, then the total."""
        seq_starts = np.zeros(self.num_sequences + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, out=seq_starts[1:])
        return seq_starts[self.document_indices]

    def _fail(self, what: str) -> DataError:
        return DataError(f"{self.idx_file}: {what}; the shard is corrupt, re-create it "
                         "with tools/shard.py")

    def _check_idx_size(self, num_seq: int, num_doc_idx: int) -> None:
        """The file must hold exactly the arrays the header announces (modes optional)."""
        expected = HEADER_BYTES + 12 * num_seq + 8 * num_doc_idx
        actual = self.idx_file.stat().st_size
        if actual not in (expected, expected + num_seq):
            raise self._fail(f"size {actual} bytes does not match its header "
                             f"({num_seq} sequences, {num_doc_idx} document entries)")

    def _check_index_arrays(self) -> None:
        """Lengths, pointers and document boundaries must describe a packed .bin."""
        lengths, docs = self.sequence_lengths, self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths):
            raise self._fail("document index does not start at 0 and end at the sequence count")
        if np.any(np.diff(docs) < 0) or np.any(lengths < 0):
            raise self._fail("document index decreases or a sequence length is negative")
        if not np.array_equal(self.sequence_pointers, _pointers(lengths, self.dtype.itemsize)):
            raise self._fail("sequence pointers are not back to back")

    def _map_bin(self) -> np.ndarray:
        """Memory-map `.bin` after checking its size against the index."""
        expected = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        try:
            actual = self.bin_file.stat().st_size
        except FileNotFoundError:
            raise DataError(f"data file {self.bin_file} is missing; re-create the shard "
                            "with tools/shard.py") from None
        if actual != expected:
            raise DataError(f"{self.bin_file}: {actual} bytes but its index describes "
                            f"{expected}; the shard is truncated or corrupt, re-create it "
                            "with tools/shard.py")
        if expected == 0:  # np.memmap refuses empty files
            return np.empty(0, dtype=self.dtype)
        return np.memmap(self.bin_file, dtype=self.dtype, mode="r")
