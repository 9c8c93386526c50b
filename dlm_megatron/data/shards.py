"""A shard directory: token shards (Megatron indexed or WebDataset tar) + `manifest.json`.

manifest.json (written last, so a directory without it is an unfinished write):

    {"manifest_version": 1, "format": "megatron" | "wds",
     "tokenizer_sha256": hex, "tokenizer_file": file name (a hint), "vocab_size": int,
     "dtype": "uint16" | "int32", "num_docs": int, "num_tokens": int,
     "shards": [{"name": "shard-00000", "num_docs": int, "num_tokens": int,
                 "files": {"shard-00000.bin": {"sha256": hex, "bytes": int}, ...}}, ...],
     "source": {...}}     # optional provenance from the writer (e.g. tools/shard.py)

Documents are never split across shards; a new shard starts once the current one holds at
least `target_shard_tokens` tokens. Empty documents are skipped (they carry no tokens).
`open_shards` checks the tokenizer hash, headers, sizes and counts (O(shards); with
``verify=True`` also every file's sha256 and index arrays), then exposes the documents as
one flat token stream (`DocStore`).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from dlm_megatron.data import DataError
from dlm_megatron.data.encode_pool import (
    CHUNK_CHARS,
    CHUNK_DOCS,
    IN_FLIGHT_CHARS,
    chunk_texts,
    encode_chunk,
    init_worker,
)
from dlm_megatron.data.indexed import IndexedReader, IndexedWriter, bin_path
from dlm_megatron.data.indexed import _read_header as _read_idx_header
from dlm_megatron.data.tokenizer import Tokenizer
from dlm_megatron.data.wds import WdsShardReader, WdsShardWriter

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("megatron", "wds")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MiB uint16 files


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype both formats agree on: uint16 if every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _file_record(path: Path) -> dict:
    """sha256 and size of a finished shard file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"sha256": digest, "bytes": path.stat().st_size}


class _ShardSink:
    """Rolls documents into numbered shards of about `target_tokens` tokens each."""

    def __init__(self, out_dir: Path, fmt: str, dtype: np.dtype, target_tokens: int,
                 records: list[dict] | None = None, on_close=None) -> None:
        self.out_dir, self.fmt, self.dtype = out_dir, fmt, dtype
        self.target_tokens = target_tokens
        self.records: list[dict] = list(records or [])  # finished shards (resume)
        self.on_close = on_close  # called after each shard is finished
        self._writer = None
        self._docs = self._tokens = 0
        self._total_docs = sum(r["num_docs"] for r in self.records)

    def add(self, tokens: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        self._writer.add_document(tokens)
        self._docs += 1
        self._tokens += len(tokens)
        self._total_docs += 1
        if self._tokens >= self.target_tokens:
            self._close()

    def finish(self) -> list[dict]:
        if self._writer is not None:
            self._close()
        return self.records

    def _name(self) -> str:
        return f"shard-{len(self.records):05d}"

    def _open(self) -> None:
        base = self.out_dir / self._name()
        if self.fmt == "megatron":
            self._writer = IndexedWriter(base, self.dtype)
        else:
            self._writer = WdsShardWriter(f"{base}.tar", self.dtype, first_key=self._total_docs)

    def _close(self) -> None:
        if self.fmt == "megatron":
            self._writer.finalize()
            files = [f"{self._name()}.bin", f"{self._name()}.idx"]
        else:
            self._writer.close()
            files = [f"{self._name()}.tar"]
        self.records.append({
            "name": self._name(),
            "num_docs": self._docs,
            "num_tokens": self._tokens,
            "files": {f: _file_record(self.out_dir / f) for f in files},
        })
        self._writer = None
        self._docs = self._tokens = 0
        if self.on_close is not None:
            self.on_close(self.records)


def _check_ids(tokens: np.ndarray, vocab_size: int) -> None:
    """Out-of-vocabulary ids would index past the embedding table at train time."""
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise DataError(f"token id {int(tokens.max())} or {int(tokens.min())} is outside the "
                        f"vocabulary [0, {vocab_size}); tokenize with the same tokenizer you "
                        "pass to write_shards")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory unless asked to."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"output directory {out_dir} is not empty; remove it or pass "
                        "--overwrite (overwrite=True)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory under `parent` that honours the umask (mkdtemp forces 0700,
    which would make finished shard directories private to their writer)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _install(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished directory into place (atomic rename on one filesystem)."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        trash = make_temp_dir(out_dir.parent, f".{out_dir.name}.old-")
        os.replace(out_dir, trash / "old")
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)  # rename(2) may replace an empty directory


PROGRESS_NAME = ".progress.json"


def _resume_dir(out_dir: Path, resume_key: str) -> Path:
    """The deterministic build directory of a resumable write (sibling of `out_dir`)."""
    return out_dir.parent / f".{out_dir.name}.partial-{resume_key[:16]}"


def _load_progress(tmp_dir: Path, resume_key: str) -> dict:
    """Finished shards of an interrupted write: {"docs_consumed": n, "records": [...]}.

    Only shards whose files still match their recorded sha256 are kept; anything else in
    the directory (e.g. the shard being written when the run died) is discarded.
    """
    empty = {"docs_consumed": 0, "records": []}
    try:
        state = json.loads((tmp_dir / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return empty
    if not isinstance(state, dict) or state.get("resume_key") != resume_key:
        return empty
    try:
        for record in state["records"]:
            for name, expected in record["files"].items():
                if _file_record(tmp_dir / name) != expected:
                    return empty
    except (OSError, KeyError, TypeError):
        return empty
    keep = {n for r in state["records"] for n in r["files"]} | {PROGRESS_NAME}
    for path in tmp_dir.iterdir():
        if path.name not in keep:
            path.unlink()
    return {"docs_consumed": int(state["docs_consumed"]), "records": state["records"]}


def resume_point(out_dir: str | Path, resume_key: str) -> int:
    """How many input documents the finished shards of an interrupted `write_shards(...,
    resume_key=resume_key)` already hold (0 if there is nothing to resume). The caller
    skips that many items of its document iterable before calling write_shards again."""
    tmp_dir = _resume_dir(Path(out_dir), resume_key)
    if not (tmp_dir / PROGRESS_NAME).is_file():
        return 0
    return _load_progress(tmp_dir, resume_key)["docs_consumed"]


def write_shards(
    docs: Iterable[Sequence[int] | np.ndarray],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    fmt: str = "megatron",
    target_shard_tokens: int = DEFAULT_SHARD_TOKENS,
    *,
    overwrite: bool = False,
    source: dict | Callable[[], dict] | None = None,
    resume_key: str | None = None,
) -> dict:
    """Write tokenized documents as shards + manifest.json into `out_dir`; return the manifest.

    Args:
        docs: token id sequences, one per document, in corpus order.
        out_dir: destination; built in a sibling temp directory and renamed into place.
        tokenizer: the tokenizer that produced `docs` (its sha256 goes in the manifest).
        fmt: "megatron" (.bin/.idx) or "wds" (.tar).
        target_shard_tokens: start a new shard once a shard reaches this many tokens.
        overwrite: replace a non-empty `out_dir`.
        source: optional JSON-able provenance stored as manifest["source"], or a function
            returning it, called once every document has been consumed (so it can report
            what the reader skipped on the way).
        resume_key: make the write resumable: build in `.NAME.partial-KEY` (kept if the
            write is interrupted) and record finished shards in its `.progress.json`.
            The key must identify the input and every setting that changes the output
            (tools/shard.py hashes them). A later call with the same key keeps the
            finished shards; `docs` must then start `resume_point(out_dir, key)` items
            in. The result is byte-identical to an uninterrupted write.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown shard format {fmt!r}; use one of {', '.join(FORMATS)}")
    if target_shard_tokens < 1:
        raise DataError(f"target_shard_tokens must be >= 1, got {target_shard_tokens}")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    dtype = token_dtype(tokenizer.vocab_size)
    state = {"docs_consumed": 0, "records": []}
    if resume_key is None:
        tmp_dir = make_temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    else:
        tmp_dir = _resume_dir(out_dir, resume_key)
        tmp_dir.mkdir(exist_ok=True)
        state = _load_progress(tmp_dir, resume_key)
    consumed = state["docs_consumed"]

    def save_progress(records: list[dict]) -> None:
        tmp = tmp_dir / (PROGRESS_NAME + ".tmp")
        tmp.write_text(json.dumps({"resume_key": resume_key, "docs_consumed": consumed,
                                   "records": records}))
        os.replace(tmp, tmp_dir / PROGRESS_NAME)

    keep = False
    try:
        sink = _ShardSink(tmp_dir, fmt, dtype, target_shard_tokens, state["records"],
                          on_close=None if resume_key is None else save_progress)
        for doc in docs:
            consumed += 1  # before add(): a shard closed by this doc includes it
            tokens = np.asarray(doc)
            if len(tokens):
                _check_ids(tokens, tokenizer.vocab_size)
                sink.add(tokens)
        records = sink.finish()
        if not records:
            raise DataError(f"no documents to write to {out_dir}: the corpus is empty "
                            "(every input was empty or skipped); check the input paths")
        manifest = _build_manifest(records, fmt, tokenizer, dtype, source() if callable(source) else source)
        (tmp_dir / PROGRESS_NAME).unlink(missing_ok=True)
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp_dir, out_dir)
    except DataError:
        raise  # bad input or settings: nothing worth resuming
    except BaseException:
        keep = resume_key is not None  # interrupted: keep finished shards for a rerun
        raise
    finally:
        if not keep:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def _build_manifest(records: list[dict], fmt: str, tokenizer: Tokenizer, dtype: np.dtype,
                    source: dict | None) -> dict:
    """The manifest dict (fixed key order so identical corpora give identical bytes)."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_file": Path(tokenizer.path).name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "num_docs": sum(r["num_docs"] for r in records),
        "num_tokens": sum(r["num_tokens"] for r in records),
        "shards": records,
    }
    if source is not None:
        manifest["source"] = source
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    """Load and sanity-check `shard_dir/manifest.json`."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{shard_dir} is not a shard directory (no {MANIFEST_NAME}); create "
                        "one with `python tools/shard.py --input ... --output DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-create the shards with "
                        "tools/shard.py") from None
    required = ("format", "tokenizer_sha256", "vocab_size", "dtype", "num_docs",
                "num_tokens", "shards")
    missing = [k for k in required if k not in manifest] if isinstance(manifest, dict) else required
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; re-create the shards with "
                        "tools/shard.py")
    if manifest["format"] not in FORMATS:
        raise DataError(f"{path}: unknown format {manifest['format']!r} (expected "
                        f"{' or '.join(FORMATS)}); re-create the shards with tools/shard.py")
    return manifest


def _check_tokenizer(shard_dir: Path, manifest: dict, expected_sha: str | None) -> None:
    """A corpus tokenized with another vocabulary must never be trained on silently."""
    if expected_sha is None or manifest["tokenizer_sha256"] == expected_sha:
        return
    raise DataError(
        f"shards in {shard_dir} were made with tokenizer sha {manifest['tokenizer_sha256'][:16]} "
        f"({manifest.get('tokenizer_file', '?')}), but the config uses {expected_sha[:16]}; "
        "re-shard with `python tools/shard.py --tokenizer YOUR_TOKENIZER` or set "
        "data.tokenizer to the tokenizer the shards were made with"
    )


def _verify_files(shard_dir: Path, record: dict) -> None:
    """Every shard file must exist with the recorded size and sha256."""
    for name, expected in record["files"].items():
        path = shard_dir / name
        if not path.is_file():
            raise DataError(f"shard file {path} listed in {MANIFEST_NAME} is missing; "
                            "re-create the shards with tools/shard.py")
        actual = _file_record(path)
        if actual != expected:
            raise DataError(f"shard file {path} does not match its sha256/size in "
                            f"{MANIFEST_NAME} (corrupt or modified); re-create the shards "
                            "with tools/shard.py")


class _Shard:
    """One shard: cheap checks when opened, readers built on first use.

    Opening costs O(1) whatever the shard holds: every file listed in the manifest must
    exist with its recorded size (a truncated file is named here), and a Megatron ``.idx``
    must have a valid header whose counts match the manifest. The per-document arrays are
    read only when needed (the index cache's one-time build, ``--verify``, or a reader
    without a cache), and ``full_check`` validates them then.
    """

    def __init__(self, shard_dir: Path, fmt: str, record: dict, dtype: np.dtype) -> None:
        self.base = shard_dir / record["name"]
        self.fmt, self.record, self.dtype = fmt, record, dtype
        self.num_docs, self.num_tokens = int(record["num_docs"]), int(record["num_tokens"])
        self._reader = None
        self._flat = None
        self._check_files(shard_dir)

    def _check_files(self, shard_dir: Path) -> None:
        for name, expected in self.record["files"].items():
            path = shard_dir / name
            if not path.is_file():
                raise DataError(f"shard file {path} listed in {MANIFEST_NAME} is missing; "
                                "re-create the shards with tools/shard.py")
            if self.fmt == "megatron" and name.endswith(".idx"):
                self._check_idx_header(path)
            elif name.endswith(".tar"):
                with open(path, "rb") as f:
                    if f.read(512)[257:262] != b"ustar":
                        raise DataError(f"{path} is not a tar archive (no ustar header); the shard is "
                                        "corrupt, re-create it with tools/shard.py")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise DataError(f"{path}: {size} bytes but {MANIFEST_NAME} records {expected['bytes']}; "
                                "the shard is truncated or corrupt, re-create it with tools/shard.py")

    def _check_idx_header(self, path: Path) -> None:
        dtype, num_seq, num_doc_idx = _read_idx_header(path)
        if dtype != self.dtype or num_doc_idx - 1 != self.num_docs:
            raise DataError(f"{path} holds {num_doc_idx - 1} {dtype} documents but {MANIFEST_NAME} says "
                            f"{self.num_docs} {self.dtype}; re-create the shards with tools/shard.py")
        expected = 34 + 12 * num_seq + 8 * num_doc_idx  # header, lengths, pointers, doc index
        size = path.stat().st_size
        if size not in (expected, expected + num_seq):  # (+ modes in multimodal files)
            raise DataError(f"{path}: size {size} bytes does not match its header ({num_seq} sequences, "
                            f"{num_doc_idx} document entries); the shard is corrupt, re-create it with tools/shard.py")

    def reader(self):
        """The full reader (O(documents) to open, index arrays validated)."""
        if self._reader is None:
            if self.fmt == "megatron":
                self._reader = IndexedReader(self.base)
            else:
                self._reader = WdsShardReader(f"{self.base}.tar", self.dtype)
            found = (self._reader.dtype, self._reader.num_documents, int(self.doc_offsets_of(self._reader)[-1]))
            if found != (self.dtype, self.num_docs, self.num_tokens):
                raise DataError(f"shard {self.base} holds {found[1]} docs / {found[2]} {found[0]} tokens but "
                                f"{MANIFEST_NAME} says {self.num_docs} / {self.num_tokens} {self.dtype}; "
                                "re-create the shards with tools/shard.py")
        return self._reader

    @staticmethod
    def doc_offsets_of(reader) -> np.ndarray:
        return reader.document_token_offsets() if isinstance(reader, IndexedReader) else reader.token_offsets

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64[num_docs + 1]: where each document starts in the shard's token stream."""
        return self.doc_offsets_of(self.reader())

    def tokens(self, lo: int, hi: int) -> np.ndarray:
        if self.fmt == "wds":
            return self.reader().tokens(lo, hi)
        if self._flat is None:  # .bin is the flat token stream (sequences back to back)
            self._flat = np.memmap(bin_path(self.base), dtype=self.dtype, mode="r")
        return self._flat[lo:hi]


class DocStore:
    """All documents of a shard directory as one flat token stream.

    Opening is O(shards): counts come from the manifest (checked against each shard's
    header and sizes). ``doc_offsets`` is built on first use (O(documents)); training reads
    the document boundaries from the index cache instead (data/index_cache.py).

    Attributes:
        path, manifest, format, dtype, vocab_size, tokenizer_sha256, manifest_sha256.
        num_docs, num_tokens.
        doc_offsets: int64[num_docs + 1], start of each document in the flat stream.
    """

    def __init__(self, shard_dir: Path, manifest: dict, shards: list[_Shard], manifest_sha256: str = "") -> None:
        self.path = shard_dir
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.format = manifest["format"]
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size = int(manifest["vocab_size"])
        self.tokenizer_sha256 = manifest["tokenizer_sha256"]
        self._shards = shards
        self._shard_starts = np.cumsum([0] + [s.num_tokens for s in shards], dtype=np.int64)
        self.num_tokens = int(self._shard_starts[-1])
        self.num_docs = sum(s.num_docs for s in shards)
        self._doc_offsets = None

    @property
    def doc_offsets(self) -> np.ndarray:
        if self._doc_offsets is None:
            self._doc_offsets = np.concatenate(
                [s.doc_offsets[:-1] + start for s, start in zip(self._shards, self._shard_starts)]
                + [self._shard_starts[-1:]]).astype(np.int64)
        return self._doc_offsets

    def write_eot_positions(self, out: np.ndarray) -> None:
        """Fill ``out`` (int64[num_docs]) with each document's end in the EOT-joined stream
        (its end offset plus the EOTs before it), shard by shard (one shard's arrays in
        memory at a time)."""
        done = 0
        for shard, start in zip(self._shards, self._shard_starts):
            ends = shard.doc_offsets[1:] + start
            out[done: done + shard.num_docs] = ends + np.arange(done, done + shard.num_docs, dtype=np.int64)
            done += shard.num_docs
            shard._reader = None  # let the shard's index arrays go

    def __len__(self) -> int:
        return self.num_docs

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Flat tokens [start, stop) (a view inside one Megatron shard, else a copy)."""
        start, stop = max(start, 0), min(stop, self.num_tokens)
        if start >= stop:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        parts = []
        for k in range(first, len(self._shards)):
            base = int(self._shard_starts[k])
            if base >= stop:
                break
            parts.append(self._shards[k].tokens(start - base if start > base else 0,
                                                min(stop - base, self._shards[k].num_tokens)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i`."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range [0, {self.num_docs})")
        i %= self.num_docs
        return self.tokens(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.document(i) for i in range(self.num_docs))


def open_shards(
    shard_dir: str | Path,
    expected_tokenizer_sha: str | None = None,
    verify: bool = False,
) -> DocStore:
    """Open a shard directory written by `write_shards` (or tools/shard.py).

    Args:
        shard_dir: directory holding manifest.json and the shard files.
        expected_tokenizer_sha: if given, the manifest's tokenizer sha256 must match.
        verify: the full offline check (``tools/shard.py --verify``): every file's sha256
            and every shard's index arrays, reading all data once. Without it (training)
            opening is O(shards): headers, sizes and counts only.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    _check_tokenizer(shard_dir, manifest, expected_tokenizer_sha)
    if manifest["num_docs"] == 0 or not manifest["shards"]:
        raise DataError(f"{shard_dir} holds no documents; re-create it from a non-empty corpus")
    dtype = np.dtype(manifest["dtype"])
    shards = []
    for record in manifest["shards"]:
        # Headers, sizes and counts first (cheap, and they name a truncated file or a bad
        # header precisely); then, if asked, the full content hashes and index arrays.
        shards.append(_Shard(shard_dir, manifest["format"], record, dtype))
        if verify:
            _verify_files(shard_dir, record)
            shards[-1].reader()
    manifest_sha = hashlib.sha256((shard_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    store = DocStore(shard_dir, manifest, shards, manifest_sha)
    if (store.num_docs, store.num_tokens) != (manifest["num_docs"], manifest["num_tokens"]):
        raise DataError(f"{shard_dir}/{MANIFEST_NAME} totals disagree with its shards; "
                        "re-create the shards with tools/shard.py")
    return store


# --- parallel tokenization (used by tools/shard.py and the builtin corpus) -------------
# The worker side lives in encode_pool (no numpy there, so workers start quickly).


def _split_chunk(result: tuple, dtype: np.dtype) -> Iterator[np.ndarray]:
    """One array per document: views into the chunk's flat buffer (no copy)."""
    buf, lengths = result
    assert buf.itemsize == dtype.itemsize, (buf.typecode, dtype)
    flat = np.frombuffer(buf, dtype=dtype)
    start = 0
    for n in lengths:
        yield flat[start:start + n]
        start += n


def tokenize_texts(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    workers: int = 1,
    chunk_chars: int = CHUNK_CHARS,
    chunk_docs: int = CHUNK_DOCS,
) -> Iterator[np.ndarray]:
    """Tokenize texts in order, optionally in `workers` processes; yields one array per text.

    Output is identical for any worker count: chunks are formed independently of it and
    results are yielded in submission order. About IN_FLIGHT_CHARS of text per worker is
    in flight (at least 2 chunks), so memory stays bounded on corpora of any size.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    chunks = chunk_texts(texts, chunk_chars, chunk_docs)
    if workers <= 1:
        for chunk in chunks:
            yield from _split_chunk(encode_chunk(chunk, dtype.char, tokenizer), dtype)
        return
    import multiprocessing

    # spawn: forking a process whose tokenizer thread pool is running can deadlock.
    ctx = multiprocessing.get_context("spawn")
    window = workers * max(2, IN_FLIGHT_CHARS // max(chunk_chars, 1))
    with ctx.Pool(workers, init_worker, (str(tokenizer.path), tokenizer.sha256)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk, dtype.char)))
            if len(pending) >= window:
                yield from _split_chunk(pending.popleft().get(), dtype)
        while pending:
            yield from _split_chunk(pending.popleft().get(), dtype)
