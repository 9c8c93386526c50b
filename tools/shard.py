#!/usr/bin/env python
"""Tokenize text/JSONL files into a shard directory (Megatron .bin/.idx or WebDataset .tar).

    python tools/shard.py --input 'data/*.jsonl.gz' --tokenizer tok.json \\
        --output shards/train --format megatron --workers 8

Inputs (files, directories or globs, taken in the order given, each expanded sorted):
  *.jsonl / *.ndjson / *.json   one JSON object per line; the document is --field
  anything else                 plain text: the whole file is one document, or each
                                non-empty line with --docs-per-line
  any of the above + .gz        gzip-compressed
Bad JSONL lines (invalid JSON, not an object, missing/non-string field, invalid UTF-8)
are skipped, counted and reported at the end. The output is byte-identical for any
--workers value. Errors are one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

if importlib.util.find_spec("dlm_megatron") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dlm_megatron.data import DataError, load_tokenizer  # noqa: E402
from dlm_megatron.data.shards import (  # noqa: E402
    DEFAULT_SHARD_TOKENS,
    FORMATS,
    tokenize_texts,
    write_shards,
)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
GLOB_CHARS = "*?["
MAX_EXAMPLES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every flag is documented for --help."""
    parser = argparse.ArgumentParser(
        description="Tokenize plain-text / JSONL (optionally .gz) files into token shards "
        "plus manifest.json; use the output directory as a data path in the config.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                        help="input files, directories (all files below, sorted) or quoted "
                        "glob patterns (** allowed); order is kept, duplicates dropped.")
    parser.add_argument("--tokenizer", default="builtin", metavar="FILE",
                        help="HF tokenizers JSON file, or 'builtin' for the shipped "
                        "Shakespeare BPE (default: %(default)s).")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="output shard directory (must be empty or absent unless "
                        "--overwrite).")
    parser.add_argument("--format", choices=FORMATS, default="megatron",
                        help="megatron: .bin/.idx indexed dataset; wds: WebDataset .tar of "
                        "{key}.tokens.npy members (default: %(default)s).")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes; output is identical for any N "
                        "(default: %(default)s).")
    parser.add_argument("--field", default="text", metavar="NAME",
                        help="JSONL field holding the document text (default: %(default)s).")
    parser.add_argument("--docs-per-line", action="store_true",
                        help="plain-text inputs: each non-empty line is a document (default: "
                        "each file is one document).")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                        help="start a new shard once one holds N tokens; documents are never "
                        "split (default: %(default)s).")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --output directory.")
    args = parser.parse_args(argv)
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
    """'jsonl' or 'text', from the suffix after removing a trailing .gz."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


class Stats:
    """Counts of what was skipped, with a few examples for the final report."""

    def __init__(self) -> None:
        self.bad = 0
        self.empty = 0
        self.examples: list[str] = []

    def bad_record(self, where: str, why: str) -> None:
        self.bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {why}")


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


def iter_texts(files: list[Path], args: argparse.Namespace, stats: Stats) -> Iterator[str]:
    """All documents of all inputs in order; blank documents are counted and skipped."""
    for path in files:
        try:
            texts = (_jsonl_texts(path, args.field, stats) if _kind(path) == "jsonl"
                     else _plain_texts(path, args.docs_per_line, stats))
            for text in texts:
                if text.strip():
                    yield text
                else:
                    stats.empty += 1
        except (OSError, EOFError) as exc:  # unreadable or truncated (e.g. bad .gz)
            raise DataError(f"cannot read input {path} ({exc}); fix or remove it") from None


class Progress:
    """Pass token arrays through while printing one updating progress line to stderr."""

    def __init__(self, interval: float = 1.0) -> None:
        self.docs = self.tokens = 0
        self.start = self._last = time.perf_counter()
        self.interval = interval
        self.tty = sys.stderr.isatty()

    def wrap(self, docs: Iterable) -> Iterator:
        for doc in docs:
            self.docs += 1
            self.tokens += len(doc)
            now = time.perf_counter()
            if now - self._last >= (self.interval if self.tty else 10 * self.interval):
                self._last = now
                self._print(now)
            yield doc
        if self.tty and self.docs:
            print(file=sys.stderr)

    def _print(self, now: float) -> None:
        rate = self.tokens / max(now - self.start, 1e-9)
        line = (f"shard.py: {self.docs} docs, {self.tokens / 1e6:.2f}M tokens, "
                f"{rate / 1e6:.2f}M tok/s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Shard everything; return the exit status."""
    files = expand_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer)
    stats, progress = Stats(), Progress()
    docs = progress.wrap(tokenize_texts(iter_texts(files, args, stats), tokenizer, args.workers))
    source = {"inputs": args.input, "num_files": len(files), "field": args.field,
              "docs_per_line": args.docs_per_line}
    try:
        manifest = write_shards(docs, args.output, tokenizer, args.format, args.shard_tokens,
                                overwrite=args.overwrite, source=source)
    except DataError as exc:
        if stats.bad:  # an "empty corpus" caused by bad records deserves the reason
            first = stats.examples[0]
            raise DataError(f"{exc} ({stats.bad} bad records, first: {first})") from None
        raise
    elapsed = time.perf_counter() - progress.start
    print(f"shard.py: wrote {manifest['num_docs']} docs, {manifest['num_tokens']} tokens in "
          f"{len(manifest['shards'])} {args.format} shards to {args.output} ({elapsed:.1f}s); "
          f"skipped {stats.empty} empty docs, {stats.bad} bad records")
    if stats.bad:
        print(f"shard.py: warning: skipped {stats.bad} bad records; first: "
              + "; ".join(stats.examples), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, exit status 2 for bad input."""
    args = parse_args(argv)
    try:
        return run(args)
    except DataError as exc:
        print(f"shard.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shard.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
