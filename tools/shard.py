#!/usr/bin/env python
"""Tokenize text/JSONL/Parquet files into a shard directory (Megatron .bin/.idx or WebDataset .tar).

    python tools/shard.py --input 'data/*.jsonl.gz' --tokenizer tok.json \\
        --output shards/train --format megatron --workers 8

Inputs (files, directories or globs, taken in the order given, each expanded sorted):
  *.jsonl / *.ndjson / *.json   one JSON object per line; the document is --field
  *.parquet                     one document per row of column --field (needs pyarrow)
  anything else                 plain text: the whole file is one document, or each
                                non-empty line with --docs-per-line
  text/JSONL + .gz / .zst       gzip- / zstandard-compressed (.zst needs zstandard)
Tokenizer: a HF tokenizer.json, 'builtin', or a tiktoken BPE ranks file (*.tiktoken).
Bad records (JSONL: invalid JSON, not an object, missing/non-string field, invalid UTF-8;
Parquet: null/non-string value, invalid UTF-8) are skipped, counted and reported at the
end, and the manifest records how many and the first locations (--on-bad-record skip, the
default); --on-bad-record fail stops at the first one (exit 2, its file:line) and leaves no
output. The output is byte-identical for any --workers value.

Resume: finished shards are recorded in OUTPUT's sibling build directory
(.NAME.partial-KEY/.progress.json). If a run is interrupted (Ctrl-C, kill, crash),
rerunning the same command skips the documents of the finished shards (they are read but
not tokenized again) and produces byte-identical output. KEY hashes the input files
(paths, sizes, mtimes) and every option that changes the output, so a changed command
starts afresh; --no-resume always starts afresh. Errors are one line on stderr with exit
status 2.

    python tools/shard.py --verify shards/train

checks an existing shard directory (every file's sha256 against the manifest, headers,
counts, index arrays) and prints a summary, with the records skipped when it was written,
or the one broken file. Training checks only headers, sizes and counts (start-up must not
read the corpus), so run --verify after copying a corpus.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

if importlib.util.find_spec("dlm_megatron") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Light imports only at module level: the tokenizer worker processes (spawned) import this
# file as __mp_main__, and they need neither numpy nor the shard writer.
from dlm_megatron.data import DataError, load_tokenizer  # noqa: E402

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSED_SUFFIXES = (".gz", ".zst")
PARQUET_BATCH_ROWS = 1024
GLOB_CHARS = "*?["
MAX_EXAMPLES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every flag is documented for --help."""
    from dlm_megatron.data.shards import DEFAULT_SHARD_TOKENS, FORMATS

    parser = argparse.ArgumentParser(
        description="Tokenize plain-text / JSONL (optionally .gz) files into token shards "
        "plus manifest.json; use the output directory as a data path in the config.",
    )
    parser.add_argument("--verify", metavar="DIR", default=None,
                        help="check an existing shard directory instead of writing one: the "
                        "manifest, headers, document counts and every file's size and sha256 "
                        "(reads all data once). Prints a summary, or one error line with exit "
                        "status 2.")
    parser.add_argument("--input", nargs="+", metavar="PATH_OR_GLOB",
                        help="input files, directories (all files below, sorted) or quoted "
                        "glob patterns (** allowed); order is kept, duplicates dropped.")
    parser.add_argument("--tokenizer", default="builtin", metavar="FILE",
                        help="HF tokenizers JSON file, a tiktoken BPE ranks file (*.tiktoken, "
                        "e.g. gpt2.tiktoken; eot/mask/pad are appended), or 'builtin' for the "
                        "shipped Shakespeare BPE (default: %(default)s).")
    parser.add_argument("--output", metavar="DIR",
                        help="output shard directory (must be empty or absent unless "
                        "--overwrite).")
    parser.add_argument("--format", choices=FORMATS, default="megatron",
                        help="megatron: .bin/.idx indexed dataset; wds: WebDataset .tar of "
                        "{key}.tokens.npy members (default: %(default)s).")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes; output is identical for any N "
                        "(default: %(default)s).")
    parser.add_argument("--field", default="text", metavar="NAME",
                        help="JSONL field / Parquet column holding the document text "
                        "(default: %(default)s).")
    parser.add_argument("--docs-per-line", action="store_true",
                        help="plain-text inputs: each non-empty line is a document (default: "
                        "each file is one document).")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                        help="start a new shard once one holds N tokens; documents are never "
                        "split (default: %(default)s).")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --output directory.")
    parser.add_argument("--on-bad-record", choices=("skip", "fail"), default="skip",
                        help="skip: count bad records (invalid JSON/UTF-8, missing field, "
                        "null), report the first locations and record them in the manifest; "
                        "fail: stop at the first one with exit status 2 naming its file:line, "
                        "leaving no output (default: %(default)s).")
    parser.add_argument("--no-resume", action="store_true",
                        help="ignore (and discard) the finished shards of an interrupted "
                        "earlier run of the same command instead of resuming it.")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (a summary line is still printed).")
    args = parser.parse_args(argv)
    if args.verify is None and (not args.input or not args.output):
        parser.error("--input and --output are required (or check existing shards with --verify DIR)")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.shard_tokens < 1:
        parser.error(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    return args


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, directories and globs, in order, without duplicates."""
    files: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise DataError(f"no files match --input {pattern!r}; check the pattern")
        elif Path(pattern).is_dir():
            matches = sorted(p for p in Path(pattern).rglob("*") if p.is_file())
            if not matches:
                raise DataError(f"--input directory {pattern} contains no files")
        elif Path(pattern).is_file():
            matches = [Path(pattern)]
        else:
            raise DataError(f"--input {pattern} does not exist; check the path")
        files.extend(matches)
    return list(dict.fromkeys(files))


def _kind(path: Path) -> str:
    """'parquet', 'jsonl' or 'text', from the suffix after removing a .gz/.zst."""
    name = path.name
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def _require(module: str, why: str):
    """Import an optional dependency, or fail with a one-line install hint."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = {"pyarrow.parquet": "pyarrow"}.get(module, module)
        raise DataError(f"{why} needs the {package} package: pip install {package}") from None


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        zstandard = _require("zstandard", f"reading {path} (.zst)")
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader, 1 << 20)  # adds readline/iteration
    return open(path, "rb")


class Stats:
    """Counts of what was skipped, with a few examples for the final report; with
    ``fail=True`` the first bad record stops the run instead."""

    def __init__(self, fail: bool = False) -> None:
        self.bad = 0
        self.empty = 0
        self.examples: list[str] = []
        self.fail = fail

    def bad_record(self, where: str, why: str) -> None:
        if self.fail:
            raise DataError(f"bad record at {where}: {why}; fix the input or pass "
                            "--on-bad-record skip to skip such records")
        self.bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {why}")

    def summary(self) -> dict:
        """What the manifest records about skipped input (see --verify)."""
        return {"bad_records": self.bad, "empty_documents": self.empty,
                "first_bad_records": list(self.examples)}


def _jsonl_texts(path: Path, field: str, stats: Stats) -> Iterator[str]:
    """Documents of a JSONL file; bad lines are counted, not fatal."""
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                stats.bad_record(f"{path}:{lineno}", f"invalid JSON ({type(exc).__name__})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                stats.bad_record(f"{path}:{lineno}", f"no string field {field!r}")
                continue
            yield record[field]


def _plain_texts(path: Path, per_line: bool, stats: Stats) -> Iterator[str]:
    """Documents of a plain-text file (the whole file, or one per line)."""
    with _open_binary(path) as f:
        if not per_line:
            try:
                yield f.read().decode("utf-8")
            except UnicodeDecodeError as exc:
                stats.bad_record(str(path), f"not UTF-8 ({exc.reason} at byte {exc.start})")
            return
        for lineno, line in enumerate(f, 1):
            try:
                yield line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                stats.bad_record(f"{path}:{lineno}", "not UTF-8")


def _parquet_texts(path: Path, field: str, stats: Stats) -> Iterator[str]:
    """Column `field` of each row group of a Parquet file; bad values are counted."""
    if path.name.endswith(COMPRESSED_SUFFIXES):
        raise DataError(f"{path}: Parquet files are compressed internally; decompress the "
                        "outer .gz/.zst")
    pq = _require("pyarrow.parquet", f"reading {path} (Parquet)")
    import pyarrow as pa

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({str(exc)[:120]}); fix or "
                        "remove it") from None
    names = pfile.schema_arrow.names
    if field not in names:
        raise DataError(f"{path} has no column {field!r} (columns: {', '.join(names[:10])}); "
                        "pass --field COLUMN")
    row = 0
    try:
        for batch in pfile.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        stats.bad_record(f"{path}:row {row}", "not UTF-8")
                        continue
                if not isinstance(value, str):
                    what = "null" if value is None else type(value).__name__
                    stats.bad_record(f"{path}:row {row}", f"{field!r} is {what}, not a string")
                    continue
                yield value
    except pa.ArrowException as exc:
        raise DataError(f"cannot read {path} after row {row} ({str(exc)[:120]}); fix or "
                        "remove it") from None


def iter_texts(files: list[Path], args: argparse.Namespace, stats: Stats) -> Iterator[str]:
    """All documents of all inputs in order; blank documents are counted and skipped."""
    for path in files:
        try:
            kind = _kind(path)
            if kind == "parquet":
                texts = _parquet_texts(path, args.field, stats)
            elif kind == "jsonl":
                texts = _jsonl_texts(path, args.field, stats)
            else:
                texts = _plain_texts(path, args.docs_per_line, stats)
            for text in texts:
                if text.strip():
                    yield text
                else:
                    stats.empty += 1
        except (OSError, EOFError) as exc:  # unreadable or truncated (e.g. bad .gz)
            raise DataError(f"cannot read input {path} ({exc}); fix or remove it") from None
        except Exception as exc:  # e.g. zstandard.ZstdError on a corrupt .zst
            if type(exc).__module__.split(".")[0] != "zstandard":
                raise
            raise DataError(f"cannot read input {path} ({exc}); fix or remove it") from None


class Progress:
    """Pass token arrays through while showing a tqdm bar (docs, docs/s, tokens/s) on a
    terminal, or a plain status line every 10 s when stderr is not a terminal."""

    def __init__(self, initial_docs: int = 0, enabled: bool = True,
                 interval: float = 1.0) -> None:
        self.docs = self.tokens = 0
        self.start = self._last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.interval = interval if self.tty else 10 * interval
        self.enabled = enabled
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(desc="shard.py", unit="doc", initial=initial_docs,
                            dynamic_ncols=True, mininterval=interval, file=sys.stderr)

    def wrap(self, docs: Iterable) -> Iterator:
        try:
            for doc in docs:
                self.docs += 1
                self.tokens += len(doc)
                now = time.perf_counter()
                if self.enabled and now - self._last >= self.interval:
                    self._show(now)
                yield doc
        finally:
            if self.bar is not None:
                self._show(time.perf_counter())
                self.bar.close()

    def _show(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        tok_rate = f"{self.tokens / elapsed / 1e3:.1f}k tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / 1e6:.2f}M tok, {tok_rate}", refresh=False)
            self.bar.update(self.docs - (self.bar.n - self.bar.initial))
        else:
            print(f"shard.py: {self.docs} docs ({self.docs / elapsed:.0f} docs/s), "
                  f"{self.tokens / 1e6:.2f}M tokens ({tok_rate})", file=sys.stderr, flush=True)
        self._last = now


def resume_key(files: list[Path], args: argparse.Namespace, tokenizer_sha: str) -> str:
    """Hash of everything that determines the output (not --workers: output ignores it)."""
    inputs = []
    for path in files:
        st = path.stat()
        inputs.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    material = {"inputs": inputs, "tokenizer": tokenizer_sha, "format": args.format,
                "field": args.field, "docs_per_line": args.docs_per_line,
                "shard_tokens": args.shard_tokens, "patterns": args.input}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def run(args: argparse.Namespace) -> int:
    """Shard everything; return the exit status."""
    from dlm_megatron.data.shards import resume_point, tokenize_texts, write_shards

    files = expand_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer)
    key = resume_key(files, args, tokenizer.sha256)
    out_dir = Path(args.output)
    skip = 0
    if args.no_resume:
        shutil.rmtree(out_dir.parent / f".{out_dir.name}.partial-{key[:16]}", ignore_errors=True)
    else:
        skip = resume_point(out_dir, key)
    if skip:
        print(f"shard.py: resuming an interrupted run: {skip} documents already sharded",
              file=sys.stderr)
    stats, progress = Stats(fail=args.on_bad_record == "fail"), Progress(skip, enabled=not args.no_progress)
    texts = itertools.islice(iter_texts(files, args, stats), skip, None)
    docs = progress.wrap(tokenize_texts(texts, tokenizer, args.workers))

    def source() -> dict:  # called by write_shards after the last document: stats are final
        return {"inputs": args.input, "num_files": len(files), "field": args.field,
                "docs_per_line": args.docs_per_line, "skipped": stats.summary()}
    try:
        manifest = write_shards(docs, args.output, tokenizer, args.format, args.shard_tokens,
                                overwrite=args.overwrite, source=source, resume_key=key)
    except DataError as exc:
        if stats.bad:  # an "empty corpus" caused by bad records deserves the reason
            first = stats.examples[0]
            raise DataError(f"{exc} ({stats.bad} bad records, first: {first})") from None
        raise
    elapsed = time.perf_counter() - progress.start
    rate = progress.tokens / max(elapsed, 1e-9)
    print(f"shard.py: wrote {manifest['num_docs']} docs, {manifest['num_tokens']} tokens in "
          f"{len(manifest['shards'])} {args.format} shards to {args.output} ({elapsed:.2f}s, "
          f"{progress.docs / max(elapsed, 1e-9):.0f} docs/s, {rate / 1e3:.1f}k tok/s"
          f"{f', resumed after {skip} docs' if skip else ''}); "
          f"skipped {stats.empty} empty docs, {stats.bad} bad records")
    if stats.bad:
        print(f"shard.py: warning: skipped {stats.bad} bad records; first: "
              + "; ".join(stats.examples), file=sys.stderr)
    return 0


def verify(shard_dir: str) -> int:
    """--verify: open the shards with full content hashing; print what was checked."""
    from dlm_megatron.data.shards import open_shards

    store = open_shards(shard_dir, verify=True)
    files = sum(len(r["files"]) for r in store.manifest["shards"])
    print(f"shard.py: {shard_dir}: OK ({store.num_docs} documents, {store.num_tokens} tokens, "
          f"{len(store.manifest['shards'])} shards, {files} files sha256-verified)")
    skipped = (store.manifest.get("source") or {}).get("skipped")
    if skipped is None:
        print("shard.py: the manifest does not record skipped input (written by an older tools/shard.py "
              "or by write_shards directly)")
    else:
        first = "; first: " + "; ".join(skipped["first_bad_records"]) if skipped["bad_records"] else ""
        print(f"shard.py: when written, {skipped['bad_records']} bad records and "
              f"{skipped['empty_documents']} empty documents were skipped{first}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, exit status 2 for bad input."""
    args = parse_args(argv)
    try:
        return verify(args.verify) if args.verify is not None else run(args)
    except DataError as exc:
        print(f"shard.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shard.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
